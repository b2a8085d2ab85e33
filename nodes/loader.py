"""Lens Model Loader: the denoiser, the text encoder and the VAE from ComfyUI's model folders."""

from __future__ import annotations

import logging
import threading

import torch

from ..lens_core import LensError, load_dit, load_text_encoder, load_tokenizer, load_vae
from ..lens_core.checkpoint.safetensors_reader import fingerprint
from ..lens_core.device import describe, resolve_compute
from ..lens_core.dit.quant import FP8_WEIGHT_DTYPES
from ..lens_core.memory import placement
from ..lens_core.memory.placement import TEXT_ENCODER_PLACEMENTS
from ..lens_core.presets import guess_variant
from .comfy_bridge import compute_device, list_models, model_path
from .common import CATEGORY
from .managed import Managed

log = logging.getLogger("lens_core")
HF = "https://huggingface.co/Comfy-Org/Lens/resolve/main"
_cache: dict = {}
_cache_lock = threading.Lock()


def _load_once(kind: str, path: str, settings, loader):
    """Reuse a model loaded from the same file content with the same load-time settings (ComfyUI re-runs loaders on
    every prompt). The key is the file's content hash, not its size and date, so a replaced file always reloads.
    One lock for all loads: two nodes asking for one file at once load it once."""
    key = (kind, path, fingerprint(path), settings)
    with _cache_lock:
        if key not in _cache:
            for old in [k for k in _cache if k[0] == kind]:
                del _cache[old]
            _cache[key] = loader()
        return _cache[key]


class LensModelLoader:
    DESCRIPTION = ("Loads the three Lens models. Files go in ComfyUI/models: the denoiser in diffusion_models/, "
                   "GPT-OSS-20B in text_encoders/, the FLUX.2 VAE in vae/. Download: https://huggingface.co/Comfy-Org/Lens")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LENS_MODEL", "LENS_TEXT_ENCODER", "LENS_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The Lens denoiser (DiT).", "GPT-OSS-20B with its tokenizer.", "The FLUX.2 VAE with the Lens latent statistics.")

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
            "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": "Keep the models on the GPU between runs (faster, uses VRAM). "
                                                                     "Off: each model moves to the GPU only while it runs."}),
            "text_encoder_device": (list(TEXT_ENCODER_PLACEMENTS), {
                "default": "auto", "tooltip": "auto: gpu where the GPU holds the whole encoder with room to spare (16 GB cards and up), "
                                              "else gpu_stream_experts. gpu: all of GPT-OSS-20B on the GPU (11.4 GB). cpu: on the CPU "
                                              "(~14 GB of RAM, no VRAM; slower, but prompts are cached on disk). gpu_stream_experts: on "
                                              "the GPU with its expert banks (10 of its 12.6 GB) left in CPU memory, each routed expert "
                                              "copied over as needed (~1.3 GB of VRAM)."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": "Compile the denoiser's blocks with torch.compile: faster sampling after a "
                                                                 "warm-up at load (the log says how long); new sizes reuse it."}),
            "blocks_on_cpu": ("INT", {"default": 0, "min": -1, "max": 47, "tooltip": "Block swap for small GPUs: this many of the 48 "
                                      "denoiser blocks stay in CPU memory and stream to the GPU as they run (~170 MB each in bf16). "
                                      "-1: as many as the GPU's memory needs. 0: all on the GPU (fastest)."}),
            "attention": (["sdpa", "sage"], {"default": "sdpa", "tooltip": "sdpa: PyTorch's attention, any device. sage: SageAttention "
                                                                           "(needs the sageattention package, NVIDIA GPUs; passes with a padded "
                                                                           "negative prompt still use sdpa)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, dit_name, text_encoder_name, vae_name, **_settings):
        """Re-run when a file's content changes under the same name (a hash of its header and a sample of its data)."""
        hashes = []
        for kind, name in (("diffusion_models", dit_name), ("text_encoders", text_encoder_name), ("vae", vae_name)):
            try:
                hashes.append(f"{name}:{fingerprint(model_path(kind, name))}")
            except (OSError, LensError):  # missing or broken: the loader reports it when it runs
                hashes.append(f"{name}:unreadable")
        return "|".join(hashes)

    def load(self, dit_name, text_encoder_name, vae_name, variant, weight_dtype, keep_loaded, text_encoder_device="auto", compile=False,
             blocks_on_cpu=0, attention="sdpa"):
        """The denoiser, text encoder and VAE, shared with other loader nodes on the same files; this node's block swap,
        attention and encoder placement are applied whenever its models are used (see Managed.prepare)."""
        device = compute_device()
        fp8 = weight_dtype if weight_dtype in FP8_WEIGHT_DTYPES else None
        _, dtype = resolve_compute(device, None if weight_dtype == "auto" or fp8 else weight_dtype, what="the Lens models")
        dit_path, te_path, vae_path = (model_path("diffusion_models", dit_name), model_path("text_encoders", text_encoder_name),
                                       model_path("vae", vae_name))
        dit = _load_once("dit", dit_path, (dtype, fp8, compile),
                         lambda: load_dit(dit_path, device="cpu", dtype=dtype, weight_dtype=fp8, compile=compile))
        encoder = _load_once("te", te_path, dtype, lambda: load_text_encoder(te_path, device="cpu", dtype=dtype))
        tokenizer = _load_once("tok", te_path, None, lambda: load_tokenizer(te_path))
        vae = _load_once("vae", vae_path, dtype, lambda: load_vae(vae_path, device="cpu", dtype=dtype))
        if encoder.config.hidden != dit.config.text_width:
            raise ValueError(f"{text_encoder_name} gives {encoder.config.hidden}-wide features but {dit_name} expects "
                             f"{dit.config.text_width}: pick the GPT-OSS-20B text encoder made for Lens.")
        resolved = guess_variant(dit_name, dit.file_metadata) if variant == "auto" else variant
        swapped = placement.blocks_on_cpu(blocks_on_cpu, dit, device)
        encoder_placement = placement.text_encoder_placement(text_encoder_device, encoder, device)
        encoder_device = torch.device("cpu") if encoder_placement == "cpu" else device
        if text_encoder_device == "auto" and encoder_placement != "gpu":
            log.info("Lens Model Loader: text encoder placement auto -> %s (the GPU's memory is too small for all of it)",
                     encoder_placement)
        for what, model, runs_on in ((f"denoiser {dit_name} ({resolved})", dit, device),
                                     (f"text encoder {text_encoder_name}", encoder, encoder_device), (f"VAE {vae_name}", vae, device)):
            log.info("Lens Model Loader: %s", describe(what, model, runs_on))

        def prepare_dit(model):
            model.swap_blocks(swapped)
            model.use_attention(attention)

        def prepare_encoder(model):
            model.set_expert_streaming(encoder_placement == "gpu_stream_experts")

        return (Managed(dit, device, keep_loaded, {"variant": resolved, "name": dit_name}, prepare_dit),
                Managed(encoder, encoder_device, keep_loaded, {"tokenizer": tokenizer}, prepare_encoder),
                Managed(vae, device, keep_loaded))
