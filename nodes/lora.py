"""Lens LoRA Loader: a Lens model plus one LoRA file from models/loras, at a strength; chain it for several."""

from __future__ import annotations

from dataclasses import replace

from ..lens_core import apply_loras, load_lora
from .comfy_bridge import list_models, model_path
from .common import CATEGORY


class LensLoraLoader:
    DESCRIPTION = ("Applies a Lens LoRA (musubi-tuner / kohya, diffusers / PEFT or ComfyUI format) to a Lens model. Chain several "
                   "loaders to stack LoRAs. The base weights are shared, not copied; strength 0 leaves the model as it was.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("LENS_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens model computing with this LoRA (and any applied before it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LENS_MODEL", {"tooltip": "From Lens Model Loader or another Lens LoRA Loader."}),
            "lora_name": (list_models("loras"), {"tooltip": "A Lens LoRA in models/loras (.safetensors). LoRAs for other models "
                                                            "(SDXL, FLUX, Qwen-Image...) are refused with a message."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the LoRA applies; negative values push away from it, 0 turns it off."}),
        }}

    def apply(self, model, lora_name, strength):
        if strength == 0:
            return (model,)
        lora = load_lora(model_path("loras", lora_name), model.model)
        names = model.extras.get("loras", ()) + (f"{lora_name}@{strength:g}",)
        return (replace(model, model=apply_loras(model.model, [(lora, strength)]), extras={**model.extras, "loras": names}),)
