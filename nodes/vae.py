"""Lens VAE Decode / Encode between ComfyUI IMAGE ([B, H, W, 3] in [0, 1]) and Lens LATENT."""

from __future__ import annotations

from ..lens_core.errors import require_finite
from .comfy_bridge import intermediate_device
from .common import CATEGORY, check_latent


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
        latent = check_latent(samples)
        with vae.use() as lens_vae:
            image = lens_vae.decode(latent, tile={"auto": None, "on": True, "off": False}[tiling])
        return (((image + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous(),)


class LensVAEEncode:
    DESCRIPTION = "Encodes an image into a Lens latent for img2img (sides not multiple of 16 are centre-cropped)."
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("A Lens latent; sample it with denoise < 1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LENS_VAE", {"tooltip": "From Lens Model Loader."}),
            "pixels": ("IMAGE", {"tooltip": "The image to start from (e.g. Load Image)."}),
        }}

    def encode(self, vae, pixels):
        require_finite(pixels, "the IMAGE input of Lens VAE Encode", "Check the node that made the image.")
        image = pixels[..., :3].permute(0, 3, 1, 2) * 2.0 - 1.0
        with vae.use() as lens_vae:
            latent = lens_vae.encode(image)
        return ({"samples": latent.to(intermediate_device())},)
