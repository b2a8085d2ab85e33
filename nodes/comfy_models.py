"""Lens models as ComfyUI models: the denoiser a standard MODEL, the text encoder and the VAE under ComfyUI's standard
patcher too, so ComfyUI's model manager loads, partially loads, offloads and unloads all three like its own.

- The denoiser is lens_core's LensDiT built from ComfyUI's layer classes (comfy.ops, via `operations=`), inside a
  `comfy.model_base.BaseModel` with the model sampling of native Lens (ModelType.FLUX, shift 1.829) and the FLUX.2
  latent format, wrapped in whatever class ComfyUI binds to `comfy.model_patcher.CoreModelPatcher`.
- `LensBaseModel` differs from BaseModel in two places only: its extra conditioning (the text features and their
  mask, as native Lens writes them) and the call of its diffusion model, which takes the token layout and the
  DIFFUSION_MODEL wrappers run around it.
- Packed layers (fp8, mxfp8, GGUF; lens_core/quant/layers.py) keep their weights packed when ComfyUI merges a weight
  patch (a LoRA) into the weights it loads whole: the patch is attached to be applied after decoding instead
  (`attach_packed_patches`, a standard ON_LOAD callback of the patcher).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lens_core.dit.layout import latent_to_tokens, tokens_to_latent
from ..lens_core.quant.layers import PackedLinear
from ..lens_core.vae.latent import LATENT_RGB_BIAS, LATENT_RGB_FACTORS
from . import comfy_bridge as comfy

LENS_SHIFT = 1.829  # native Lens's default (its shipped templates); the pack's own samplers use the reference schedule
LATENT_CHANNELS = 128


def latent_format_class():
    """ComfyUI's FLUX.2 latent format (128 channels at 1/16, previews through a 2x2 unfold) where it has one; else an
    equivalent whose preview factors average each 2x2 block of the 32-channel latent (older previewers cannot unfold)."""
    native = getattr(comfy.latent_formats, "Flux2", None)
    if native is not None:
        return native

    class LensLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = LATENT_CHANNELS
        spacial_downscale_ratio = 16

        def __init__(self):
            self.latent_rgb_factors = [[value / 4 for value in LATENT_RGB_FACTORS[channel // 4]] for channel in range(LATENT_CHANNELS)]
            self.latent_rgb_factors_bias = list(LATENT_RGB_BIAS)

        def process_in(self, latent):
            return latent

        def process_out(self, latent):
            return latent

    return LensLatentFormat


def operations(compute_dtype: torch.dtype, load_device: torch.device):
    """The layer classes ComfyUI picks for this dtype and device, with Linear layers that always own their weights.

    With dynamic VRAM on Windows, ComfyUI builds Linear layers without weights and gives them theirs in
    `load_state_dict`. The pack's loaders put each tensor in place themselves (one at a time, as read), so they build
    every Linear the ordinary way (on the `meta` device: no memory) and keep the rest of ComfyUI's behaviour."""
    picked = comfy.ops.pick_operations(compute_dtype, None, load_device=load_device)

    class Linear(picked.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)

        def _load_from_state_dict(self, *args, **kwargs):
            nn.Linear._load_from_state_dict(self, *args, **kwargs)

    return type("LensOperations", (picked,), {"Linear": Linear})


def model_config(compute_dtype: torch.dtype):
    """Native Lens's configuration where ComfyUI has it, else one with the same model sampling and latent format."""
    native = getattr(comfy.supported_models, "Lens", None)
    if native is None:
        class LensConfig(comfy.supported_models_base.BASE):
            unet_config = {}
            sampling_settings = {"shift": LENS_SHIFT}
            latent_format = latent_format_class()
            memory_usage_factor = 8.0  # ~0.65 GB of activations per image at 1024x1024 (flash attention)
            supported_inference_dtypes = [torch.bfloat16, torch.float32]
        native = LensConfig
    config = native({})
    config.set_inference_dtype(compute_dtype, None)
    return config


class LensBaseModel:
    """Built by `lens_base_model` as a subclass of ComfyUI's BaseModel (its class is only known inside ComfyUI)."""

    def extra_conds(self, **kwargs):
        """The text features as they are (CONDRegular: batches of different lengths run apart, never padded by repeating)
        and their attention mask. Features that are all zero (ConditioningZeroOut) are the reference's empty prompt:
        no real text token."""
        out = super().extra_conds(**kwargs)
        features = kwargs.get("cross_attn")
        if features is None:
            return out
        out["c_crossattn"] = comfy.conds.CONDRegular(features)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.int64)
        if features.shape[1] and not features.any():
            mask = torch.zeros_like(mask)
        out["attention_mask"] = comfy.conds.CONDRegular(mask.reshape(features.shape[:2]))
        return out

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        sigma = t
        dtype = self.manual_cast_dtype or self.get_dtype()
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        context = comfy.model_management.cast_to_device(c_crossattn, xc.device, dtype)
        mask = kwargs.get("attention_mask")
        timestep = self.model_sampling.timestep(t).float()
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
        output = comfy.patcher_extension.WrapperExecutor.new_class_executor(self._diffusion_model, self, wrappers).execute(
            xc, timestep, context, mask, transformer_options)
        return self.model_sampling.calculate_denoised(sigma, output.float(), x)

    def _diffusion_model(self, x, timestep, context, attention_mask=None, transformer_options=None):
        """The denoiser in ComfyUI's latent layout: x [B, 128, h, w], context [B, S, layers * width], mask [B, S]."""
        b, _, h, w = x.shape
        dit = self.diffusion_model
        text = context.unflatten(-1, (dit.config.text_layers, -1))
        mask = None if attention_mask is None else attention_mask.to(x.device).bool()
        velocity = dit(latent_to_tokens(x), timestep, text, mask, (h, w), transformer_options=transformer_options, device=x.device)
        return tokens_to_latent(velocity, (h, w))


def lens_base_model(config, dit, variant: str | None):
    """`dit` (a LensDiT built from ComfyUI's operations) inside a BaseModel of ComfyUI's own class hierarchy."""
    cls = type("LensModel", (LensBaseModel, comfy.model_base.BaseModel), {})
    model = cls(config, comfy.model_base.ModelType.FLUX, device=comfy.model_management.unet_offload_device(),
                unet_model=lambda **_: dit)
    model.lens_variant = variant
    return model


def attach_packed_patches(patcher, *_):
    """ON_LOAD callback: each packed layer applies its weight patch (a LoRA) after decoding, on the compute device.
    ComfyUI's partial and dynamic loading hand such patches to cast-on-use layers already; for layers it loads whole,
    merging into packed weights is declined (PackedLinear.set_weight), so the patch is attached here. One attribute,
    reset at every load, so a patch never applies twice or outlives its patcher's load."""
    for name, module in patcher.model.named_modules():
        if isinstance(module, PackedLinear):
            key = f"{name}.weight"
            module.weight_function = [f for f in module.weight_function if not isinstance(f, comfy.model_patcher.LowVramPatch)]
            module.weight_lowvram_function = comfy.model_patcher.LowVramPatch(key, patcher.patches) if key in patcher.patches else None


def detach_packed_patches(patcher, *_):
    """ON_DETACH callback: when ComfyUI unloads the model, no packed layer keeps its patch."""
    for module in patcher.model.modules():
        if isinstance(module, PackedLinear):
            module.weight_lowvram_function = None


def patcher_class():
    """The patcher ComfyUI uses for its own models (dynamic VRAM rebinds it in recent releases)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def denoiser_patcher(dit, variant: str | None):
    config = model_config(dit.dtype)
    patcher = patcher_class()(lens_base_model(config, dit, variant), load_device=comfy.model_management.get_torch_device(),
                              offload_device=comfy.model_management.unet_offload_device())
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, attach_packed_patches)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, detach_packed_patches)
    return patcher


class Holder(nn.Module):
    """What a patcher holds for the text encoder: ComfyUI's patcher writes `model.device`, which lens_core's models
    expose as a read-only property of their weights' device."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def plain_patcher(model: nn.Module, load_device: torch.device, offload_device: torch.device):
    """A patcher for the text encoder or the VAE model: loaded and unloaded by ComfyUI's manager like its own."""
    return patcher_class()(Holder(model), load_device=load_device, offload_device=offload_device)
