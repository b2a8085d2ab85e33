"""Lens Sampler (Lens / Lens-Base, norm-rescaled CFG) and Lens Turbo Sampler (4 steps, one pass each)."""

from __future__ import annotations

import logging

import torch

from ..lens_core import sample
from ..lens_core.presets import LIMITS, check_variant_settings
from ..lens_core.sampling import check_sample_inputs, make_noise
from ..lens_core.vae.latent import latent_preview
from .comfy_bridge import Progress, check_cancel, intermediate_device
from .common import CATEGORY, LENS_CHANNELS, check_latent
from .encode import from_conditioning

log = logging.getLogger("lens_core")
SEED_INPUT = ("INT", {"default": 0, "min": LIMITS["seed"][0], "max": LIMITS["seed"][1], "control_after_generate": True,
                      "tooltip": "Noise seed. Noise is drawn on the CPU exactly as ComfyUI's own samplers draw it, so a seed "
                                 "gives the same image on any GPU and the same start as a native Lens graph."})
NATIVE_EMPTY_CHANNELS = (4, 16)  # EmptyLatentImage / EmptySD3LatentImage: all zeros at 1/8 of the pixel size


def _preview(x0: torch.Tensor):
    from PIL import Image

    rgb = (latent_preview(x0[:1])[0] * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(rgb)


def lens_latent(latent: dict) -> torch.Tensor:
    """The LATENT's samples as a Lens latent. An all-zero latent from ComfyUI's EmptyLatentImage (4 channels at
    1/8 of the pixel size) becomes the empty Lens latent of the same pixel size, as native samplers do."""
    samples = latent["samples"]
    if samples.ndim == 4 and samples.shape[1] in NATIVE_EMPTY_CHANNELS and not samples.any():
        h, w = max(1, round(samples.shape[2] / 2)), max(1, round(samples.shape[3] / 2))
        if (h * 2, w * 2) != tuple(samples.shape[2:]):
            log.warning("Lens: an empty %dx%d latent is not a multiple of 16 pixels; using %dx%d",
                        samples.shape[3] * 8, samples.shape[2] * 8, w * 16, h * 16)
        return samples.new_zeros(samples.shape[0], LENS_CHANNELS, h, w)
    return check_latent(latent)


def run_sampler(model, positive, negative, latent, seed, steps, cfg, denoise):
    samples = lens_latent(latent)
    dit = model.model
    layers = dit.config.text_layers
    cond = from_conditioning(positive, layers, "positive")
    uncond = from_conditioning(negative, layers, "negative") if negative is not None and cfg != 1.0 else None
    check_variant_settings(model.extras.get("variant", "lens"), steps, cfg)
    noise = make_noise(seed, tuple(samples.shape), convention="comfy", batch_index=latent.get("batch_index"))
    img2img = denoise < 1.0
    check_sample_inputs(dit.config, noise, cond, uncond, steps, cfg, denoise, samples if img2img else None)
    progress = Progress(steps)
    show_previews = progress.shows_previews

    def on_step(step, total, x0):
        progress.update(step, total, _preview(x0) if show_previews else None)

    with model.use() as dit_on_device:
        out = sample(dit_on_device, noise, cond, uncond, steps, cfg, denoise=denoise,
                     init_latent=samples if img2img else None, callback=on_step, should_stop=check_cancel)
    return ({**latent, "samples": out.to(intermediate_device())},)


class _SamplerNode:
    """What both sampler nodes declare alike."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised Lens latent (decode with Lens VAE Decode).",)


class LensSampler(_SamplerNode):
    DESCRIPTION = ("Samples Lens or Lens-Base with the reference schedule (resolution-dependent shift) and the reference "
                   "norm-rescaled CFG. Lens: 20 steps, CFG 5. Lens-Base: 50 steps, CFG 5. For Lens-Turbo use Lens Turbo Sampler.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LENS_MODEL", {"tooltip": "From Lens Model Loader."}),
            "positive": ("CONDITIONING", {"tooltip": "From Lens Text Encode (or ComfyUI's native Lens encoder)."}),
            "negative": ("CONDITIONING", {"tooltip": "From Lens Text Encode; an empty negative is the reference unconditional input."}),
            "latent": ("LATENT", {"tooltip": "From Lens Empty Latent (or ComfyUI's Empty Latent Image), or Lens VAE Encode "
                                             "for img2img (with denoise < 1)."}),
            "seed": SEED_INPUT,
            "steps": ("INT", {"default": 20, "min": LIMITS["steps"][0], "max": LIMITS["steps"][1], "tooltip": "Lens: 20. Lens-Base: 50."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": LIMITS["cfg"][0], "max": LIMITS["cfg"][1], "step": 0.1,
                              "tooltip": "Guidance scale; 1 skips the negative pass."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": LIMITS["denoise"][0], "max": LIMITS["denoise"][1], "step": 0.01,
                                  "tooltip": "1 = text-to-image; below 1 keeps that much "
                                                                                                 "of the input latent (img2img)."}),
        }}

    def run(self, model, positive, negative, latent, seed, steps, cfg, denoise):
        return run_sampler(model, positive, negative, latent, seed, steps, cfg, denoise)


class LensTurboSampler(_SamplerNode):
    DESCRIPTION = "Samples Lens-Turbo: 4 steps at CFG 1 (one forward pass per step, no negative prompt), the distilled schedule."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LENS_MODEL", {"tooltip": "A Lens-Turbo model from Lens Model Loader (lens_turbo_*.safetensors)."}),
            "positive": ("CONDITIONING", {"tooltip": "From Lens Text Encode."}),
            "latent": ("LATENT", {"tooltip": "From Lens Empty Latent (or ComfyUI's Empty Latent Image)."}),
            "seed": SEED_INPUT,
            "steps": ("INT", {"default": 4, "min": 1, "max": 16, "tooltip": "Lens-Turbo is distilled for 4."}),
        }}

    def run(self, model, positive, latent, seed, steps):
        if model.extras.get("variant") not in ("turbo", None):
            log.warning("Lens Turbo Sampler: %s does not look like Lens-Turbo; 4 steps at CFG 1 will be blurry. "
                        "Use Lens Sampler (20 steps, CFG 5) for it.", model.extras.get("name"))
        return run_sampler(model, positive, None, latent, seed, steps, 1.0, 1.0)
