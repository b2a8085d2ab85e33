"""Lens Text Encode: prompts -> CONDITIONING in the layout of ComfyUI's native Lens encoder.

Native layout: one [B, S, 4*2880] tensor (the four GPT-OSS layers side by side, layer 0 first) with
{"attention_mask": [B, S]} in the extras, so native and pack nodes can be mixed both ways.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import torch

from ..lens_core import PromptCache, encode_prompts
from .loader import CATEGORY

log = logging.getLogger("lens_core")
_prompt_cache = PromptCache()


def to_conditioning(features: torch.Tensor, mask: torch.Tensor) -> list:
    """features [B, S, layers, C] + mask [B, S] -> [[tensor [B, S, layers*C], {"attention_mask": mask}]]."""
    return [[features.flatten(2), {"attention_mask": mask.clone()}]]


def from_conditioning(conditioning: list, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first entry of a CONDITIONING as (features [B, S, layers, C], mask [B, S] bool)."""
    if not conditioning:
        raise ValueError("empty conditioning: connect a Lens Text Encode (or ComfyUI's Lens text encoder) output.")
    tensor, extras = conditioning[0][0], conditioning[0][1]
    if tensor.ndim != 3 or tensor.shape[-1] % layers:
        raise ValueError(f"this conditioning has shape {list(tensor.shape)}; Lens needs GPT-OSS features [B, S, {layers}x2880] "
                         "from Lens Text Encode (a CLIP/T5/Qwen conditioning will not work).")
    mask = extras.get("attention_mask")
    mask = torch.ones(tensor.shape[:2], dtype=torch.bool) if mask is None else mask.bool().reshape(tensor.shape[:2])
    return tensor.unflatten(-1, (layers, -1)), mask


class _EncoderOnDemand:
    """The encoder as `encode_prompts` sees it: moved to its device only when a prompt is not cached,
    so a cache hit never moves 13 GB of weights."""

    def __init__(self, managed, stack: ExitStack):
        self._managed, self._stack, self._on_device = managed, stack, None
        self.identity, self.config = managed.model.identity, managed.model.config

    def features(self, *args, **kwargs):
        if self._on_device is None:
            self._on_device = self._stack.enter_context(self._managed.use())
        return self._on_device.features(*args, **kwargs)


class LensTextEncode:
    DESCRIPTION = ("Encodes the positive and negative prompt with GPT-OSS-20B inside Lens's Harmony template. "
                   "An empty negative is the reference's unconditional input. Results are cached on disk.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning [B, S, 4x2880] + attention_mask.", "Negative conditioning (zeros, all masked, when empty).")

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
        tokenizer = text_encoder.extras["tokenizer"]
        with ExitStack() as stack:
            encoder = _EncoderOnDemand(text_encoder, stack)
            result = encode_prompts(encoder, tokenizer, [positive, negative], date=template_date, cache=_prompt_cache)
        if result.dropped_tokens[0]:
            log.warning("Lens Text Encode: the last %d tokens of the positive prompt did not fit the encoder's window and were cut.",
                        result.dropped_tokens[0])
        positive_length = int(result.mask[0].sum()) if result.mask[0].any() else 1
        negative_length = int(result.mask[1].sum()) if result.mask[1].any() else positive_length
        return (to_conditioning(result.features[:1, :positive_length], result.mask[:1, :positive_length]),
                to_conditioning(result.features[1:, :negative_length], result.mask[1:, :negative_length]))
