"""Prompt -> GPT-OSS features for the Lens DiT (docs/architecture.md, Text features).

The encoder sees the prompt inside the Harmony chat template. The first 97 tokens (the template
up to `<|start|>user<|message|>`) are dropped from the features; sequences are capped at 512 tokens
as in the reference, and every dropped prompt token is reported instead of vanishing silently.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch

from ..errors import LensFileError, LensInputError
from .tokenizer import PAD_ID, LensTokenizer

FIRST_CONTROL_ID = 199998  # o200k_harmony's special tokens are 199998 and up; ordinary text never maps there

log = logging.getLogger("lens_core")

FROZEN_DATE = "2026-05-23"
MAX_TOKENS = 512
PREFIX_TOKENS = 97
SUFFIX_TOKENS = 22  # the template after the prompt, from `<|end|>` on
SELECTED_LAYERS = (5, 11, 17, 23)
FEATURES_VERSION = 2  # part of every prompt-cache key: raise it when a change here alters the features

TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>developer<|message|># Instructions\n\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background.\n\n<|end|>"
    "<|start|>user<|message|>{prompt}<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Need to generate one image according to the description.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>"
)


def template_date(date: str | None) -> str:
    """"frozen" / None -> the release date (same seed, same image, any day); "today" -> today's date."""
    if date in (None, "frozen"):
        return FROZEN_DATE
    if date == "today":
        return datetime.date.today().isoformat()
    try:
        datetime.date.fromisoformat(date)
    except (TypeError, ValueError):
        raise LensInputError(f"template date {date!r} is not usable: give frozen, today or a date as YYYY-MM-DD.") from None
    return date


def replace_lone_surrogates(text: str) -> str:
    """`text` as valid Unicode: each lone surrogate (how Python hands over a non-UTF-8 byte of a command-line argument)
    becomes U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)


def strip_control_markers(prompt: str) -> str:
    """Remove Harmony markers such as `<|end|>` that would otherwise become control tokens, including those that
    removing others would form (`<|<|end|>end|>`): each marker is removed as soon as its closing `|>` arrives, so
    the text kept never holds one. Lone surrogates (e.g. a non-UTF-8 byte in a command-line argument) become U+FFFD.
    """
    kept: list[str] = []
    for char in replace_lone_surrogates(prompt):
        kept.append(char)
        if char == ">" and len(kept) >= 2 and kept[-2] == "|":
            i = len(kept) - 3
            while i >= 0 and kept[i] not in "|<>":
                i -= 1
            if i >= 1 and kept[i] == "|" and kept[i - 1] == "<":
                del kept[i - 1:]
    return "".join(kept)


def render_prompt(prompt: str, date: str | None = FROZEN_DATE) -> str:
    return TEMPLATE.format(date=template_date(date), prompt=strip_control_markers(prompt))


def render_and_tokenize(tokenizer: LensTokenizer, prompt: str, date: str | None = FROZEN_DATE) -> list[int]:
    """All ids of the rendered template, before the 512 cap and before the 97-token drop."""
    ids = tokenizer.encode(render_prompt(prompt, date))
    template_ids = tokenizer.encode(TEMPLATE.format(date=template_date(date), prompt=""))
    if sum(i >= FIRST_CONTROL_ID for i in ids) != sum(i >= FIRST_CONTROL_ID for i in template_ids):
        raise LensInputError(f"the prompt {prompt[:60]!r}... still produces Harmony control tokens after its markers "
                             "were removed; rephrase the <|...|> parts of it.")
    prefix = tokenizer.encode(TEMPLATE.split("{prompt}")[0].format(date=template_date(date)))
    if len(prefix) != PREFIX_TOKENS or ids[:PREFIX_TOKENS] != prefix:
        raise LensFileError(
            f"{tokenizer.source}: the Harmony prefix is {len(prefix)} tokens, Lens expects {PREFIX_TOKENS}. "
            "This tokenizer is not GPT-OSS's o200k_harmony."
        )
    return ids


@dataclass
class EncodedPrompts:
    """features [B, S, layers, hidden] (zeros on padding), mask [B, S] bool, dropped prompt tokens per prompt."""

    features: torch.Tensor
    mask: torch.Tensor
    dropped_tokens: list[int]


def is_empty_prompt(prompt: str) -> bool:
    return not strip_control_markers(prompt).strip()


def tokenize_batch(tokenizer: LensTokenizer, prompts: list[str], date: str | None,
                   pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids [B, S] (pad `<|endoftext|>` 199999), attention mask [B, S], and prompt tokens cut by the cap."""
    rows, dropped = [], []
    for prompt in prompts:
        ids = render_and_tokenize(tokenizer, prompt, date)
        overflow = len(ids) - MAX_TOKENS
        # The reference cuts the rendered sequence from the end: the template's closing tokens go first,
        # then the end of the prompt.
        dropped.append(max(0, overflow - SUFFIX_TOKENS))
        if overflow > 0:
            log.warning("Lens: the prompt does not fit the encoder's %d-token window: %d prompt tokens and %d of the "
                        "template's closing tokens were cut (as the reference does); the prompt ends with %r",
                        MAX_TOKENS, dropped[-1], min(overflow, SUFFIX_TOKENS), prompt[-60:])
        rows.append(ids[:MAX_TOKENS])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, dropped


def encode_prompts(encoder, tokenizer: LensTokenizer, prompts: list[str] | str, date: str | None = FROZEN_DATE,
                   layers: tuple[int, ...] = SELECTED_LAYERS, cache=None) -> EncodedPrompts:
    """Prompts -> (features [B, S-97, len(layers), hidden], mask [B, S-97], dropped tokens).

    Empty / whitespace-only prompts are not encoded: zero features, all-False mask (the reference's
    unconditional input). `cache` (a PromptCache) skips the encoder for prompts seen before.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    # What the features depend on besides the prompt: the weights, the compute dtype and this code.
    identity = f"{encoder.identity}:{encoder.dtype}:v{FEATURES_VERSION}"
    results: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * len(prompts)
    todo = []
    for i, prompt in enumerate(prompts):
        if is_empty_prompt(prompt):
            continue
        hit = cache.get(identity, prompt, date, layers, encoder.config.hidden) if cache is not None else None
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    if todo:
        # Padding never reaches a real token (causal attention); small test vocabularies lack id 199999.
        pad_id = min(PAD_ID, encoder.config.vocab_size - 1)
        ids, attention, dropped = tokenize_batch(tokenizer, [prompts[i] for i in todo], date, pad_id)
        captured = encoder.features(ids, attention, layers)
        stacked = torch.stack([c[:, PREFIX_TOKENS:].float().cpu() for c in captured], dim=2)
        kept_mask = attention[:, PREFIX_TOKENS:].bool()
        for row, i in enumerate(todo):
            length = int(kept_mask[row].sum())
            results[i] = (stacked[row, :length].clone(), kept_mask[row, :length].clone(), dropped[row])
            if cache is not None:
                cache.put(identity, prompts[i], date, layers, results[i])
    hidden = encoder.config.hidden
    length = max([r[0].shape[0] for r in results if r is not None], default=1)
    features = torch.zeros(len(prompts), length, len(layers), hidden)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, result in enumerate(results):
        if result is not None:
            n = result[0].shape[0]
            features[i, :n], mask[i, :n] = result[0], result[1]
    return EncodedPrompts(features, mask, [0 if r is None else r[2] for r in results])
