"""The Lens latent space: FLUX.2 VAE latents folded 2x2 into 128 channels (docs/architecture.md, The latent space),
and the cheap RGB preview of a latent (no VAE call)."""

from __future__ import annotations

import torch
from einops import rearrange

# Rows: the 32 unfolded latent channels; columns: R, G, B (docs/architecture.md, The latent space).
LATENT_RGB_FACTORS = (
    (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
)
LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def fold(z: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w] with channel = c*4 + py*2 + px."""
    return rearrange(z, "b c (h py) (w px) -> b (c py px) h w", py=2, px=2)


def unfold(latent: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w], the inverse of `fold`."""
    return rearrange(latent, "b (c py px) h w -> b c (h py) (w px)", py=2, px=2)


def latent_preview(latent: torch.Tensor) -> torch.Tensor:
    """A BN-normalised Lens latent [B, 128, h, w] -> a small RGB image [B, 2h, 2w, 3] in [0, 1]."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latent.device)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=latent.device)
    rgb = torch.einsum("bchw,cr->bhwr", unfold(latent.float()), factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
