"""What several nodes share: their menu category and the check every LATENT input gets."""

from __future__ import annotations

import torch

from ..lens_core.errors import require_finite

CATEGORY = "Lens"
LENS_CHANNELS = 128


def check_latent(latent: dict) -> torch.Tensor:
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[1] != LENS_CHANNELS:
        raise ValueError(f"this latent has {samples.shape[1] if samples.ndim == 4 else '?'} channels; Lens latents have 128. "
                         "Use Lens Empty Latent or Lens VAE Encode (SD/SDXL/FLUX latents cannot be used).")
    if 0 in samples.shape:
        raise ValueError(f"this latent is empty (shape {list(samples.shape)}): it holds no image. Check the node that made it "
                         "(a size of 0, or a batch cut to nothing).")
    require_finite(samples, "the LATENT input", "Check the node that made it (a NaN image into VAE Encode, or a sampler "
                                                "that failed).")
    return samples
