"""Lens Text Encode: prompts -> CONDITIONING in the layout of ComfyUI's native Lens encoder.

Native layout: one [B, S, 4*2880] tensor (the four GPT-OSS layers side by side, layer 0 first) with
{"attention_mask": [B, S]} in the extras, so native and pack nodes can be mixed both ways.
"""

from __future__ import annotations

import torch

from ..lens_core import PromptCache, encode_prompts
from ..lens_core.errors import require_finite
from . import comfy_bridge as comfy
from .comfy_bridge import require_comfyui, warn
from .common import CATEGORY

_prompt_cache = PromptCache()
ENCODER_RESERVE_BYTES = 1_500_000_000  # a 512-token prompt's activations and one layer's routed experts decoded


def to_conditioning(features: torch.Tensor, mask: torch.Tensor) -> list:
    """features [B, S, layers, C] + mask [B, S] -> one CONDITIONING entry exactly as native Lens writes it:
    [B, S, layers*C] with {"attention_mask": int64 [B, S], "num_layers_stacked": layers, "pooled_output": None}."""
    return [[features.flatten(2), {"attention_mask": mask.to(torch.int64), "num_layers_stacked": features.shape[2],
                                   "pooled_output": None}]]


def check_conditioning(conditioning, width: int, which: str = "positive") -> None:
    """Refuse a CONDITIONING the Lens denoiser cannot take, with a message saying what to connect instead."""
    if not conditioning:
        raise ValueError(f"the {which} conditioning is empty: connect a Lens Text Encode (or ComfyUI's Lens text encoder) output.")
    if len(conditioning) > 1:
        raise ValueError(f"the {which} conditioning has {len(conditioning)} entries (from Conditioning Combine or a similar node); "
                         "Lens has no area or strength combination in the reference: encode the prompts together in one Lens "
                         "Text Encode instead.")
    tensor, extras = conditioning[0]
    if not torch.is_tensor(tensor) or tensor.ndim != 3 or tensor.shape[-1] != width:
        shape = list(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"the {which} conditioning has shape {shape}; Lens needs GPT-OSS features [B, S, {width}] from Lens "
                         "Text Encode (a CLIP/T5/Qwen conditioning will not work).")
    mask = (extras or {}).get("attention_mask")
    if mask is not None and mask.numel() != tensor.shape[0] * tensor.shape[1]:
        raise ValueError(f"the {which} conditioning's attention_mask has shape {list(mask.shape)} but its features have "
                         f"{tensor.shape[1]} tokens (Conditioning Concat keeps one mask); encode the whole prompt in one Lens Text Encode.")
    require_finite(tensor, f"the {which} conditioning", "Encode the prompt again; if it still happens, the text encoder's "
                                                       "weights or a node between it and the sampler are at fault.")


class _EncoderOnDemand:
    """The encoder as `encode_prompts` sees it: put on its device by ComfyUI's model manager only when a prompt is not
    cached, so a cache hit never moves 13 GB of weights."""

    def __init__(self, handle):
        self.handle = handle
        self.identity, self.config, self.dtype = handle.encoder.identity, handle.encoder.config, handle.encoder.dtype

    def features(self, *args, **kwargs):
        comfy.model_management.load_models_gpu([self.handle.patcher], memory_required=ENCODER_RESERVE_BYTES)
        return self.handle.encoder.features(*args, device=self.handle.patcher.load_device, **kwargs)


class LensTextEncode:
    DESCRIPTION = ("Encodes the positive and negative prompt with GPT-OSS-20B inside Lens's Harmony template. "
                   "An empty negative is the reference's unconditional input. Results are cached on disk.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning [B, S, 4x2880] + attention_mask, as native Lens writes it.",
                       "Negative conditioning; an empty negative has zero tokens, like native Lens's empty prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("LENS_TEXT_ENCODER", {"tooltip": "From Lens Model Loader."}),
            "positive": ("STRING", {"multiline": True, "default": "", "tooltip": "What the image shows. Long prompts are cut at "
                                                                                "the encoder's 512-token window (a warning says how much)."}),
            "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "What to avoid (used at cfg > 1). Leave empty for the "
                                                                                "reference unconditional input. Lens-Turbo ignores it."}),
        }, "optional": {
            "template_date": (["frozen", "today"], {"default": "frozen", "tooltip": "frozen: the template's date is 2026-05-23, so a seed "
                                                                                    "gives the same image any day. today: Microsoft's pipeline."}),
        }}

    def encode(self, text_encoder, positive, negative, template_date="frozen"):
        require_comfyui("Lens Text Encode")
        result = encode_prompts(_EncoderOnDemand(text_encoder), text_encoder.tokenizer, [positive, negative], date=template_date,
                                cache=_prompt_cache)
        if result.dropped_tokens[0]:
            warn(f"Lens Text Encode: the last {result.dropped_tokens[0]} tokens of the positive prompt did not fit the encoder's "
                 "window and were cut.")
        positive_length, negative_length = (int(row.sum()) for row in result.mask)
        return (to_conditioning(result.features[:1, :positive_length], result.mask[:1, :positive_length]),
                to_conditioning(result.features[1:, :negative_length], result.mask[1:, :negative_length]))
