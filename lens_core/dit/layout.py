"""Converting between the DiT's token layout and ComfyUI's LATENT layout (docs/architecture.md, The latent space).

tokens [B, h*w, 128] are the 128-channel latent vectors in row-major order; a LATENT is the same
numbers as [B, 128, h, w]. (The 128 channels are the 32 VAE channels folded 2x2: c*4 + py*2 + px.)
"""

from __future__ import annotations

import torch
from einops import rearrange


def latent_to_tokens(latent: torch.Tensor) -> torch.Tensor:
    return rearrange(latent, "b c h w -> b (h w) c")


def tokens_to_latent(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)
