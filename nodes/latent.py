"""Lens Empty Latent: a trained aspect bucket (or a custom size) -> an empty Lens LATENT."""

from __future__ import annotations

import torch

from ..lens_core.presets import ASPECTS, LIMITS, bucket_size, check_in_range, size_warnings, snap_to_16
from .comfy_bridge import intermediate_device, show_in_ui, warn
from .common import CATEGORY, LENS_CHANNELS


class LensEmptyLatent:
    DESCRIPTION = "An empty Lens latent [B, 128, H/16, W/16] at one of the trained aspect buckets (base 1024 or 1440) or a custom size."
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    OUTPUT_TOOLTIPS = ("Empty latent for the Lens samplers.", "Image width in pixels.", "Image height in pixels.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_resolution": ([1024, 1440], {"default": 1024, "tooltip": "Bucket family: ~1 MP (1024) or ~2 MP (1440)."}),
            "aspect": (list(ASPECTS) + ["custom"], {"default": "1:1", "tooltip": "Width:height of a trained bucket, or custom to use width/height."}),
            "width": ("INT", {"default": 1024, "min": LIMITS["width"][0], "max": LIMITS["width"][1], "step": 16,
                                "tooltip": "Custom width (multiple of 16; other values are snapped)."}),
            "height": ("INT", {"default": 1024, "min": LIMITS["height"][0], "max": LIMITS["height"][1], "step": 16,
                                 "tooltip": "Custom height (multiple of 16; other values are snapped)."}),
            "batch_size": ("INT", {"default": 1, "min": LIMITS["batch"][0], "max": LIMITS["batch"][1],
                                    "tooltip": "Images per run (the whole batch's noise comes from the one seed, as in ComfyUI)."}),
        }}

    def generate(self, base_resolution, aspect, width, height, batch_size):
        for name, value in (("width", width), ("height", height), ("batch", batch_size)):
            check_in_range(name, value)  # the widgets keep to these; a direct call or an edited workflow may not
        if aspect == "custom":
            snapped = snap_to_16(width), snap_to_16(height)
            if snapped != (width, height):
                warn(f"Lens Empty Latent: {width}x{height} snapped to {snapped[0]}x{snapped[1]} (multiples of 16)")
            width, height = snapped
            for text in size_warnings(height, width):  # logged by lens_core
                show_in_ui(f"Lens Empty Latent: {text}")
        else:
            height, width = bucket_size(aspect, int(base_resolution))
        latent = torch.zeros(batch_size, LENS_CHANNELS, height // 16, width // 16, device=intermediate_device())
        return ({"samples": latent}, width, height)
