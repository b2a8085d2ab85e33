"""Lens VAE Decode / Encode between ComfyUI IMAGE ([B, H, W, 3] in [0, 1]) and Lens LATENT.

ComfyUI's model manager puts the VAE on its device first (making room for the decode's activations by unloading
other models where needed); the VAE computes there, tiled when the memory left is short.
"""

from __future__ import annotations

from ..lens_core.errors import require_finite
from . import comfy_bridge as comfy
from .comfy_bridge import intermediate_device, require_comfyui
from .common import CATEGORY, check_latent


def _loaded(vae, height: int, width: int):
    """The VAE loaded by ComfyUI's manager with room for an untiled pass at height x width pixels; its compute device."""
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.vae.decode_bytes(height, width))
    return vae.patcher.load_device


class LensVAEDecode:
    DESCRIPTION = "Decodes a Lens latent with the FLUX.2 VAE; large images are decoded in blended tiles when memory is short."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The image, ready for Save Image / Preview Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LENS_VAE", {"tooltip": "From Lens Model Loader."}),
            "samples": ("LATENT", {"tooltip": "A Lens latent from a Lens sampler."}),
        }, "optional": {
            "tiling": (["auto", "on", "off"], {"default": "auto", "tooltip": "auto: tile only when free memory is short."}),
        }}

    def decode(self, vae, samples, tiling="auto"):
        require_comfyui("Lens VAE Decode")
        latent = check_latent(samples)
        scale = vae.vae.pixels_per_latent
        device = _loaded(vae, latent.shape[-2] * scale, latent.shape[-1] * scale)
        image = vae.vae.decode(latent, tile={"auto": None, "on": True, "off": False}[tiling], device=device)
        return (((image + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous(),)


class LensVAEEncode:
    DESCRIPTION = "Encodes an image into a Lens latent for img2img and inpainting (sides not multiple of 16 are centre-cropped)."
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("A Lens latent; sample it with denoise < 1, or add a noise mask (Set Latent Noise Mask) to inpaint.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LENS_VAE", {"tooltip": "From Lens Model Loader."}),
            "pixels": ("IMAGE", {"tooltip": "The image to start from (e.g. Load Image)."}),
        }}

    def encode(self, vae, pixels):
        require_comfyui("Lens VAE Encode")
        require_finite(pixels, "the IMAGE input of Lens VAE Encode", "Check the node that made the image.")
        image = pixels[..., :3].permute(0, 3, 1, 2) * 2.0 - 1.0
        device = _loaded(vae, image.shape[-2], image.shape[-1])
        latent = vae.vae.encode(image, device=device)
        return ({"samples": latent.to(intermediate_device())},)
