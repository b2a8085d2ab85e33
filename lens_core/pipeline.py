"""`LensPipeline`: prompt -> PIL images, tying the text encoder, the DiT and the VAE together.

Where the models compute: by default where each one is. With `device`, the three take turns on it: each is placed
there while it runs and goes back to CPU memory afterwards (the text encoder and the denoiser together need ~20 GB;
one at a time, ~11 GB); `encoder_device` (default: `device`) sends the text encoder elsewhere, e.g. the CPU. Block
swap (`dit.swap_blocks`) and expert streaming (`encoder.set_expert_streaming`) shrink each turn further;
placement.py's automatic choices pick them from the GPU's size (the command line does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .errors import LensInputError
from .presets import VARIANTS, check_variant_settings, size_warnings
from .sampling import check_settings, make_noise, sample
from .text.prompt import FROZEN_DATE, encode_prompts


def latents_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


@contextmanager
def taking_turns(model, device: torch.device | None):
    """`model` placed on `device` for the block (back in CPU memory after it), or left where it is when device is None."""
    if device is None:
        yield model
        return
    model.place(device)
    try:
        yield model
    finally:
        model.place("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


class LensPipeline:
    def __init__(self, dit, text_encoder, tokenizer, vae, variant: str = "lens", prompt_cache=None, date: str | None = FROZEN_DATE,
                 device: str | torch.device | None = None, encoder_device: str | torch.device | None = None):
        if variant not in VARIANTS:
            raise LensInputError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}.")
        self.dit, self.text_encoder, self.tokenizer, self.vae = dit, text_encoder, tokenizer, vae
        self.variant, self.prompt_cache, self.date = variant, prompt_cache, date
        self.device = None if device is None else torch.device(device)
        self.encoder_device = self.device if encoder_device is None else torch.device(encoder_device)

    def encode(self, prompt: str, negative: str | None):
        """(cond, uncond or None); uncond is the empty-prompt rule's zeros when negative is empty."""
        if self.text_encoder.config.hidden != self.dit.config.text_width:
            raise LensInputError(
                f"the text encoder gives {self.text_encoder.config.hidden}-wide features but this denoiser expects "
                f"{self.dit.config.text_width}: the two files do not belong together."
            )
        prompts = [prompt] if negative is None else [prompt, negative]
        encoder = _EncoderTakingTurns(self.text_encoder, self.encoder_device)
        encoded = encode_prompts(encoder, self.tokenizer, prompts, self.date, cache=self.prompt_cache)
        cond = (encoded.features[:1], encoded.mask[:1])
        uncond = None if negative is None else (encoded.features[1:], encoded.mask[1:])
        return cond, uncond, encoded.dropped_tokens[0]

    def __call__(self, prompt: str, negative: str = "", *, steps: int | None = None, cfg: float | None = None,
                 seed: int = 0, height: int = 1024, width: int = 1024, batch: int = 1,
                 init_image: torch.Tensor | None = None, denoise: float = 1.0,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
        defaults = VARIANTS[self.variant]
        steps = defaults.steps if steps is None else steps
        cfg = defaults.cfg if cfg is None else cfg
        check_settings(steps, cfg, denoise)
        if batch < 1:
            raise LensInputError(f"batch must be >= 1, got {batch}.")
        size_warnings(height, width)
        check_variant_settings(self.variant, steps, cfg)
        init_latent = None
        if init_image is not None:
            with taking_turns(self.vae, self.device) as vae:
                init_latent = vae.encode(init_image).expand(batch, -1, -1, -1)
            height, width = init_latent.shape[-2] * 16, init_latent.shape[-1] * 16
        cond, uncond, _ = self.encode(prompt, None if cfg == 1.0 else negative)
        noise = make_noise(seed, (batch, self.dit.config.in_channels, height // 16, width // 16))
        with taking_turns(self.dit, self.device) as dit:
            latent = sample(dit, noise, cond, uncond, steps, cfg, denoise=denoise, init_latent=init_latent,
                            callback=callback, should_stop=should_stop).cpu()
        with taking_turns(self.vae, self.device) as vae:
            return latents_to_pil(vae.decode(latent))


class _EncoderTakingTurns:
    """The encoder as `encode_prompts` sees it: placed on the device only when a prompt is not cached, so a cache hit
    never moves 13 GB of weights."""

    def __init__(self, encoder, device):
        self.encoder, self.device = encoder, device
        self.identity, self.config, self.dtype = encoder.identity, encoder.config, encoder.dtype

    def features(self, *args, **kwargs):
        with taking_turns(self.encoder, self.device) as encoder:
            return [f.cpu() for f in encoder.features(*args, **kwargs)]
