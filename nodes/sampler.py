"""Lens Sampler, Lens Turbo Sampler, Lens Scheduler (SIGMAS) and Lens CFG Guider (GUIDER).

All four are ComfyUI's own sampling with the reference recipe from lens_core.sampling: the schedule (FLUX.2's
resolution-dependent shift), the norm-rescaled CFG and the flow-matching Euler loop. ComfyUI places the model
(`load_models_gpu`, full or partial), applies the model's patches and wrappers, keeps the input latent outside a
`noise_mask` at every step, and shows progress and previews. Lens Sampler is SamplerCustomAdvanced with Lens
Scheduler, Lens CFG Guider and the Lens Euler sampler: the same seed gives the same image either way.
"""

from __future__ import annotations

import functools

import torch
from tqdm import tqdm

from ..lens_core.presets import LIMITS, VARIANTS, check_in_range, check_variant_settings, snap_to_16
from ..lens_core.sampling import check_settings, euler, img2img_sigmas, norm_rescaled_cfg
from . import comfy_bridge as comfy
from .comfy_bridge import intermediate_device, require_comfyui, warn
from .common import CATEGORY, LENS_CHANNELS, check_latent
from .encode import check_conditioning

SEED_INPUT = ("INT", {"default": 0, "min": LIMITS["seed"][0], "max": LIMITS["seed"][1], "control_after_generate": True,
                      "tooltip": "Noise seed. Noise is drawn on the CPU exactly as ComfyUI's own samplers draw it, so a seed "
                                 "gives the same image on any GPU and the same start as a native Lens graph."})
POSITIVE_INPUT = ("CONDITIONING", {"tooltip": "From Lens Text Encode (or ComfyUI's native Lens encoder)."})
NEGATIVE_INPUT = ("CONDITIONING", {"tooltip": "From Lens Text Encode; an empty negative is the reference unconditional input."})
CFG_INPUT = ("FLOAT", {"default": 5.0, "min": LIMITS["cfg"][0], "max": LIMITS["cfg"][1], "step": 0.1,
                       "tooltip": "Guidance scale (Lens and Lens-Base: 5); 1 skips the negative pass."})
NATIVE_EMPTY_CHANNELS = (4, 16)  # EmptyLatentImage / EmptySD3LatentImage: all zeros at 1/8 of the pixel size


def lens_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A sampler function for ComfyUI's KSAMPLER: lens_core's Euler loop on ComfyUI's denoised predictions
    (velocity = (x - denoised) / sigma), with ComfyUI's console progress bar and per-step callback."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    bar = tqdm(total=len(sigmas) - 1, disable=disable)

    def velocity(x, sigma):
        return (x - model(x, sigma * ones, **extra_args)) / sigma

    def on_step(step, total, x0):
        bar.update(1)
        if callback is not None:
            callback({"x": x0, "i": step - 1, "sigma": sigmas[step - 1], "sigma_hat": sigmas[step - 1], "denoised": x0})

    try:
        return euler(velocity, x, sigmas, on_step)
    finally:
        bar.close()


def norm_rescaled_guidance(args: dict) -> torch.Tensor:
    """ComfyUI's `sampler_cfg_function`: `cond` / `uncond` are x - denoised (sigma times the velocity, in the latent
    layout, channels on axis 1); returns the guided one (the reference's norm-rescaled CFG)."""
    if args["cond_scale"] == 1.0:
        return args["cond"]
    return norm_rescaled_cfg(args["cond"], args["uncond"], args["cond_scale"], channel_dim=1)


@functools.cache
def guider_class():
    """ComfyUI's CFGGuider with Lens's guidance (its pre- and post-CFG functions still apply)."""

    class LensGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options=None, seed=None):
            options = {**(model_options or {}), "sampler_cfg_function": norm_rescaled_guidance}
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.cfg, model_options=options, seed=seed)

    return LensGuider


def lens_guider(model, positive, negative, cfg: float):
    require_comfyui("Lens CFG Guider")
    guider = guider_class()(model)
    guider.inner_set_conds({"positive": positive} if negative is None else {"positive": positive, "negative": negative})
    guider.set_cfg(cfg)
    return guider


def check_lens_model(model) -> str | None:
    """Refuse a MODEL that is not Lens (the pack's, or native Lens from Load Diffusion Model); its variant if known."""
    base = getattr(model, "model", None)
    latent_format = getattr(base, "latent_format", None)
    if getattr(latent_format, "latent_channels", None) != LENS_CHANNELS or not hasattr(base, "diffusion_model"):
        raise ValueError("this MODEL is not Lens: connect Lens Model Loader's model (or ComfyUI's Load Diffusion Model with "
                         "a Lens file) to the Lens samplers.")
    return getattr(base, "lens_variant", None)


def lens_latent(latent: dict) -> torch.Tensor:
    """The LATENT's samples as a Lens latent. An all-zero latent from ComfyUI's EmptyLatentImage (4 channels at
    1/8 of the pixel size) becomes the empty Lens latent of the same pixel size, as native samplers do."""
    samples = latent["samples"]
    if samples.ndim == 4 and samples.shape[1] in NATIVE_EMPTY_CHANNELS and not samples.any():
        h, w = max(1, round(samples.shape[2] / 2)), max(1, round(samples.shape[3] / 2))
        if (h * 2, w * 2) != tuple(samples.shape[2:]):
            warn(f"Lens: an empty {samples.shape[3] * 8}x{samples.shape[2] * 8} latent is not a multiple of 16 pixels; "
                 f"using {w * 16}x{h * 16}")
        return samples.new_zeros(samples.shape[0], LENS_CHANNELS, h, w)
    return check_latent(latent)


def run_sampler(model, positive, negative, latent, seed, steps, cfg, denoise):
    require_comfyui("Lens Sampler")
    variant = check_lens_model(model)
    samples = lens_latent(latent)
    check_settings(steps, cfg, denoise)
    width = model.model.diffusion_model.txt_in.in_features  # the text features' width, the pack's model or native Lens
    check_conditioning(positive, width, "positive")
    if cfg != 1.0:
        check_conditioning(negative, width, "negative")
    if variant:
        for text in check_variant_settings(variant, steps, cfg):  # logged by lens_core
            comfy.show_in_ui(f"Lens: {text}")
    sigmas = img2img_sigmas(steps, denoise, samples.shape[-2] * 16, samples.shape[-1] * 16)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    guider = lens_guider(model, positive, negative if cfg != 1.0 else None, cfg)
    callback = comfy.latent_preview.prepare_callback(model, len(sigmas) - 1)
    out = guider.sample(noise, samples, comfy.samplers.KSAMPLER(lens_euler), sigmas, denoise_mask=latent.get("noise_mask"),
                        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = dict(latent)
    result["samples"] = out.to(intermediate_device())
    return (result,)


class _SamplerNode:
    """What both sampler nodes declare alike."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised Lens latent (decode with Lens VAE Decode).",)


class LensSampler(_SamplerNode):
    DESCRIPTION = ("Samples Lens or Lens-Base with the reference schedule (resolution-dependent shift) and the reference "
                   "norm-rescaled CFG. Lens: 20 steps, CFG 5. Lens-Base: 50 steps, CFG 5. For Lens-Turbo use Lens Turbo Sampler. "
                   "A latent's noise mask (Set Latent Noise Mask) keeps the image outside it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Lens model: Lens Model Loader's, or ComfyUI's Load Diffusion Model with a Lens file."}),
            "positive": POSITIVE_INPUT,
            "negative": NEGATIVE_INPUT,
            "latent": ("LATENT", {"tooltip": "From Lens Empty Latent (or ComfyUI's Empty Latent Image), or Lens VAE Encode "
                                             "for img2img (with denoise < 1) and inpainting (with a noise mask)."}),
            "seed": SEED_INPUT,
            "steps": ("INT", {"default": 20, "min": LIMITS["steps"][0], "max": LIMITS["steps"][1], "tooltip": "Lens: 20. Lens-Base: 50."}),
            "cfg": CFG_INPUT,
            "denoise": ("FLOAT", {"default": 1.0, "min": LIMITS["denoise"][0], "max": LIMITS["denoise"][1], "step": 0.01,
                                  "tooltip": "1 = text-to-image; below 1 keeps that much of the input latent (img2img)."}),
        }}

    def run(self, model, positive, negative, latent, seed, steps, cfg, denoise):
        return run_sampler(model, positive, negative, latent, seed, steps, cfg, denoise)


class LensTurboSampler(_SamplerNode):
    DESCRIPTION = "Samples Lens-Turbo: 4 steps at CFG 1 (one forward pass per step, no negative prompt), the distilled schedule."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Lens-Turbo model from Lens Model Loader (lens_turbo_*.safetensors)."}),
            "positive": ("CONDITIONING", {"tooltip": "From Lens Text Encode."}),
            "latent": ("LATENT", {"tooltip": "From Lens Empty Latent (or ComfyUI's Empty Latent Image)."}),
            "seed": SEED_INPUT,
            "steps": ("INT", {"default": 4, "min": 1, "max": 16, "tooltip": "Lens-Turbo is distilled for 4."}),
        }}

    def run(self, model, positive, latent, seed, steps):
        if check_lens_model(model) not in ("turbo", None):
            warn("Lens Turbo Sampler: this model does not look like Lens-Turbo; 4 steps at CFG 1 will be blurry. "
                 "Use Lens Sampler (20 steps, CFG 5) for it.")
        return run_sampler(model, positive, None, latent, seed, steps, 1.0, 1.0)


class LensScheduler:
    DESCRIPTION = ("The reference Lens schedule as SIGMAS, for ComfyUI's SamplerCustomAdvanced (or SamplerCustom) with any "
                   "sampler: FLUX.2's resolution-dependent shift, as Microsoft's pipeline computes it.")
    CATEGORY = CATEGORY
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("steps + 1 sigmas from 1 down to 0 (the last steps of a longer schedule when denoise < 1).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 0, "min": 0, "max": LIMITS["steps"][1],
                              "tooltip": "0: the variant's own count (Lens 20, Lens-Turbo 4, Lens-Base 50)."}),
            "width": ("INT", {"default": 1024, "min": LIMITS["width"][0], "max": LIMITS["width"][1], "step": 16,
                              "tooltip": "Image width in pixels (Lens Empty Latent's width output); the shift depends on the size."}),
            "height": ("INT", {"default": 1024, "min": LIMITS["height"][0], "max": LIMITS["height"][1], "step": 16,
                               "tooltip": "Image height in pixels (Lens Empty Latent's height output)."}),
            "variant": (["lens", "turbo", "base"], {"default": "lens", "tooltip": "Which Lens the steps are for when steps is 0."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": LIMITS["denoise"][0], "max": LIMITS["denoise"][1], "step": 0.01,
                                  "tooltip": "Below 1: the last part of a longer schedule (img2img)."}),
        }}

    def get_sigmas(self, steps, width, height, variant, denoise):
        steps = steps or VARIANTS[variant].steps
        for name, value in (("steps", steps), ("width", width), ("height", height), ("denoise", denoise)):
            check_in_range(name, value)
        return (img2img_sigmas(steps, denoise, snap_to_16(height), snap_to_16(width)),)


class LensCFGGuider:
    DESCRIPTION = ("Lens's reference guidance (norm-rescaled CFG: the guided velocity keeps the length of the positive one) as "
                   "a GUIDER for ComfyUI's SamplerCustomAdvanced; ComfyUI's own CFG Guider is plain CFG.")
    CATEGORY = CATEGORY
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's guider input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Lens model."}),
            "positive": POSITIVE_INPUT,
            "negative": NEGATIVE_INPUT,
            "cfg": CFG_INPUT,
        }}

    def get_guider(self, model, positive, negative, cfg):
        check_lens_model(model)
        return (lens_guider(model, positive, negative, cfg),)
