"""Lens LoRA Loader: a Lens MODEL plus one LoRA file from models/loras, at a strength; chain it for several.

The pack reads the file (musubi-tuner / kohya, diffusers / PEFT or ComfyUI key spellings), refuses LoRAs of other
models with a message naming what they look like, checks every layer's shapes, and hands the layers to ComfyUI as
ordinary weight patches of the MODEL: ComfyUI applies them when it loads the model (after decoding, for packed
layers) and removes them when it unloads it, as for its own LoRA Loader.
"""

from __future__ import annotations

import logging

import torch

from ..lens_core import load_lora
from . import comfy_bridge as comfy
from .comfy_bridge import list_models, model_path, require_comfyui
from .common import CATEGORY
from .sampler import check_lens_model

log = logging.getLogger("lens_core")


def comfy_patches(lora) -> dict:
    """The LoRA's layers as ComfyUI's weight patches (built by ComfyUI's own LoRA reader, so they are what the running
    ComfyUI applies), keyed by the MODEL's weight names."""
    state, key_map = {}, {}
    for name, layer in lora.layers.items():
        rank = layer.down.shape[0]
        state.update({f"{name}.lora_up.weight": layer.up, f"{name}.lora_down.weight": layer.down,
                      f"{name}.alpha": torch.tensor(layer.scale * rank)})
        key_map[name] = f"diffusion_model.{name}.weight"
    return comfy.lora.load_lora(state, key_map)


class LensLoraLoader:
    DESCRIPTION = ("Applies a Lens LoRA (musubi-tuner / kohya, diffusers / PEFT or ComfyUI format) to a Lens MODEL as ComfyUI weight "
                   "patches. Chain several loaders to stack LoRAs; strength 0 leaves the model as it was.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens model computing with this LoRA (and any applied before it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Lens model: from Lens Model Loader or another LoRA loader."}),
            "lora_name": (list_models("loras"), {"tooltip": "A Lens LoRA in models/loras (.safetensors). LoRAs for other models "
                                                            "(SDXL, FLUX, Qwen-Image...) are refused with a message."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the LoRA applies; negative values push away from it, 0 turns it off."}),
        }}

    def apply(self, model, lora_name, strength):
        require_comfyui("Lens LoRA Loader")
        if strength == 0:
            return (model,)
        check_lens_model(model)
        lora = load_lora(model_path("loras", lora_name), model.model.diffusion_model)
        patched = model.clone()
        patched.add_patches(comfy_patches(lora), strength)
        log.info("Lens LoRA Loader: %s matched %d layers (%s format), strength %g", lora_name, len(lora.layers), lora.format, strength)
        return (patched,)
