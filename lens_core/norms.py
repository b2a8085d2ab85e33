"""The RMSNorm both Lens transformers use, with float32 statistics whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, cast back to x's dtype.

    `F.rms_norm` upcasts to float32 for the statistics and the scaling (checked bit-exact against the
    explicit float32 formula in tests/test_dit.py), in one fused kernel on GPUs instead of seven.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
