"""Lens Model Loader: the denoiser (a ComfyUI MODEL), the text encoder and the VAE from ComfyUI's model folders."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from ..lens_core import LensError, load_dit, load_text_encoder, load_tokenizer, load_vae
from ..lens_core.checkpoint.identity import model_identity
from ..lens_core.checkpoint.source import model_files
from ..lens_core.device import describe, resolve_compute
from ..lens_core.dit.loader import FP8_WEIGHT_DTYPES
from ..lens_core.placement import TEXT_ENCODER_PLACEMENTS
from ..lens_core.presets import guess_variant
from ..lens_core.text.loader import encoder_files
from . import comfy_bridge as comfy
from .comfy_bridge import list_models, model_path, require_comfyui
from .comfy_models import denoiser_patcher, operations, plain_patcher
from .common import CATEGORY

log = logging.getLogger("lens_core")
HF = "https://huggingface.co/Comfy-Org/Lens/resolve/main"
_cache: dict = {}
_cache_lock = threading.Lock()


@dataclass
class LensTextEncoder:
    """LENS_TEXT_ENCODER: GPT-OSS with its tokenizer, under a ComfyUI patcher (`patcher.load_device` is where it runs)."""

    encoder: object
    tokenizer: object
    patcher: object


@dataclass
class LensVAEModel:
    """LENS_VAE: the FLUX.2 VAE with the Lens latent statistics, under a ComfyUI patcher."""

    vae: object
    patcher: object


def identity(kind: str, path: str) -> str:
    """What makes a loaded model the same (checkpoint/identity.py): the content of every file it is read from."""
    files = encoder_files(path) if kind == "text_encoders" else model_files(path, *_COMPONENTS[kind])
    return model_identity(files)


_COMPONENTS = {"diffusion_models": ("transformer", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model")}


def _load_once(kind: str, path: str, settings, loader):
    """The model loaded from this content with these settings, kept until another one of its kind is loaded (ComfyUI
    runs a loader again when a widget or a file changes: the other two models are not read again). The previous
    model of the kind is dropped before the new one loads, so RAM never holds two. One lock for all loads."""
    key = (kind, path, identity(kind, path), settings)
    with _cache_lock:
        if _cache.get(kind, (None,))[0] != key:
            _cache.pop(kind, None)
            _cache[kind] = (key, loader())
        return _cache[kind][1]


class LensModelLoader:
    DESCRIPTION = ("Loads the three Lens models. Files go in ComfyUI/models: the denoiser in diffusion_models/, "
                   "GPT-OSS-20B in text_encoders/, the FLUX.2 VAE in vae/. Download: https://huggingface.co/Comfy-Org/Lens. "
                   "The denoiser is a ComfyUI MODEL: ComfyUI's samplers, LoRA and model-patch nodes take it too.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "LENS_TEXT_ENCODER", "LENS_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The Lens denoiser (DiT) as a ComfyUI MODEL.", "GPT-OSS-20B with its tokenizer.",
                       "The FLUX.2 VAE with the Lens latent statistics.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (list_models("diffusion_models"), {"tooltip": "The denoiser, in models/diffusion_models: lens_bf16 / lens_turbo_bf16 "
                                                          "(8.2 GB) or *_mxfp8 (5.5 GB), or a GGUF (Q8_0 ... Q4_K, kept quantised), from "
                                                          f"{HF}/diffusion_models/lens_bf16.safetensors"}),
            "text_encoder_name": (list_models("text_encoders"), {"tooltip": "GPT-OSS-20B, in models/text_encoders: gpt_oss_20b_nvfp4.safetensors "
                                                                f"(13 GB) from {HF}/text_encoders/gpt_oss_20b_nvfp4.safetensors"}),
            "vae_name": (list_models("vae"), {"tooltip": f"The FLUX.2 VAE, in models/vae: flux2-vae.safetensors from {HF}/vae/flux2-vae.safetensors "
                                                         "(a FLUX.1 VAE will not work)"}),
            "variant": (["auto", "lens", "turbo", "base"], {"default": "auto", "tooltip": "auto: from the file name ('turbo' in it = Lens-Turbo). "
                                                                                           "The weights alone cannot tell."}),
            "weight_dtype": (["auto", "bf16", "fp32", *FP8_WEIGHT_DTYPES], {
                "default": "auto", "tooltip": "auto: bf16 on GPUs that compute it (NVIDIA RTX 30xx / A100 and newer, Intel XPU, Apple "
                                              "M-series on macOS 14+), fp32 elsewhere. fp8_e4m3fn: the denoiser's block weights in fp8 "
                                              "(5.5 GB instead of 8.2), computed in bf16. fp8_e4m3fn_fast: also fp8 matmuls on RTX 40xx / "
                                              "H100 and newer. fp16 is not offered: Lens overflows in fp16."}),
            "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": "No effect since 0.4: ComfyUI's model manager keeps the models on "
                                                                     "the GPU while there is room (kept so saved workflows load)."}),
            "text_encoder_device": (list(TEXT_ENCODER_PLACEMENTS), {
                "default": "auto", "tooltip": "cpu: run GPT-OSS-20B on the CPU (~14 GB of RAM, no VRAM; slower, but prompts are cached "
                                              "on disk). auto, gpu, gpu_stream_experts: on the GPU, where ComfyUI's model manager leaves "
                                              "what does not fit in CPU memory and each routed expert travels as it is needed."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": "Compile the denoiser's blocks with torch.compile on the GPU, at the "
                                                                 "first run (a warm-up of about a minute); later sizes reuse it."}),
            "blocks_on_cpu": ("INT", {"default": 0, "min": -1, "max": 47, "tooltip": "No effect since 0.4: on GPUs too small for the "
                                      "denoiser, ComfyUI's model manager loads it partially and streams the rest (kept so saved "
                                      "workflows load; `python -m lens_core` still offers block swap)."}),
            "attention": (["sdpa", "sage"], {"default": "sdpa", "tooltip": "sdpa: PyTorch's attention, any device. sage: SageAttention "
                                                                           "(needs the sageattention package, NVIDIA GPUs; passes with a padded "
                                                                           "negative prompt still use sdpa)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, dit_name, text_encoder_name, vae_name, **_settings):
        """Run again when a file's content changes under the same name (checkpoint/identity.py; remembered per version of
        the file, so this costs a stat per file once it has been hashed)."""
        parts = []
        for kind, name in (("diffusion_models", dit_name), ("text_encoders", text_encoder_name), ("vae", vae_name)):
            try:
                parts.append(f"{name}:{identity(kind, model_path(kind, name))}")
            except (OSError, LensError):  # missing or broken: the loader reports it when it runs
                parts.append(f"{name}:unreadable")
        return "|".join(parts)

    def load(self, dit_name, text_encoder_name, vae_name, variant, weight_dtype, keep_loaded, text_encoder_device="auto", compile=False,
             blocks_on_cpu=0, attention="sdpa"):
        """The denoiser, text encoder and VAE, each kept for the next run until a file or setting of it changes."""
        require_comfyui("Lens Model Loader")
        mm = comfy.model_management
        device = mm.get_torch_device()
        fp8 = weight_dtype if weight_dtype in FP8_WEIGHT_DTYPES else None
        _, dtype = resolve_compute(device, None if weight_dtype == "auto" or fp8 else weight_dtype, what="the Lens models")
        ops = operations(dtype, device)
        dit_path, te_path, vae_path = (model_path("diffusion_models", dit_name), model_path("text_encoders", text_encoder_name),
                                       model_path("vae", vae_name))

        def dit_model():
            dit = load_dit(dit_path, device=mm.unet_offload_device(), dtype=dtype, weight_dtype=fp8, compile=compile,
                           attention=attention, operations=ops)
            return denoiser_patcher(dit, guess_variant(dit_name, dit.file_metadata) if variant == "auto" else variant)

        model = _load_once("diffusion_models", dit_path, (dtype, fp8, compile, attention, variant), dit_model)
        resolved = model.model.lens_variant
        encoder_device = torch.device("cpu") if text_encoder_device == "cpu" else device

        def text_encoder():
            encoder = load_text_encoder(te_path, device="cpu", dtype=dtype, operations=ops)
            offload = torch.device("cpu") if encoder_device.type == "cpu" else mm.text_encoder_offload_device()
            return LensTextEncoder(encoder, load_tokenizer(te_path), plain_patcher(encoder, encoder_device, offload))

        encoder = _load_once("text_encoders", te_path, (dtype, encoder_device.type), text_encoder)

        def vae_model():
            vae = load_vae(vae_path, device="cpu", dtype=dtype, operations=ops)
            return LensVAEModel(vae, plain_patcher(vae.model, device, mm.vae_offload_device()))

        vae = _load_once("vae", vae_path, dtype, vae_model)
        dit = model.model.diffusion_model
        if encoder.encoder.config.hidden != dit.config.text_width:
            raise ValueError(f"{text_encoder_name} gives {encoder.encoder.config.hidden}-wide features but {dit_name} expects "
                             f"{dit.config.text_width}: pick the GPT-OSS-20B text encoder made for Lens.")
        for what, loaded, runs_on in ((f"denoiser {dit_name} ({resolved})", dit, device),
                                      (f"text encoder {text_encoder_name}", encoder.encoder, encoder_device),
                                      (f"VAE {vae_name}", vae.vae, device)):
            log.info("Lens Model Loader: %s", describe(what, loaded, runs_on))
        return model, encoder, vae
