"""3-axis rotary position embedding of the Lens DiT (adjacent-pair rotation, docs/architecture.md, The denoiser).

Positions, per token of the joint sequence [image ; text]:
- image token (r, c) of an h x w grid: (0, r - (h - h//2), c - (w - w//2)): centred, an odd
  size gets the extra negative position;
- text token j: (s + j, s + j, s + j) with s = max(h//2, w//2), i.e. after the image's half-size.

The tables are computed on the CPU in float64 (Apple GPUs have no float64) and handed to the compute device as
float32 once per size and device: the next forward at the same size finds them there.
"""

from __future__ import annotations

import functools

import torch


def token_positions(h: int, w: int, n_text: int) -> torch.Tensor:
    """[h*w + n_text, 3] float64 positions (frame, row, column) of the joint sequence, on the CPU."""
    rows = torch.arange(h, dtype=torch.float64) - (h - h // 2)
    cols = torch.arange(w, dtype=torch.float64) - (w - w // 2)
    img = torch.stack([torch.zeros(h, w, dtype=torch.float64), rows[:, None].expand(h, w), cols[None, :].expand(h, w)],
                      dim=-1).reshape(h * w, 3)
    start = max(h // 2, w // 2)
    txt = (start + torch.arange(n_text, dtype=torch.float64))[:, None].expand(n_text, 3)
    return torch.cat([img, txt], dim=0)


@functools.lru_cache(maxsize=8)
def rope_frequencies(h: int, w: int, n_text: int, axes_dims: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """[L, head_dim/2, 2, 2] float32 on `device`: for every token of the joint sequence and every channel pair, the
    rotation matrix [[cos, -sin], [sin, cos]] of its angle (the layout comfy-kitchen's fused kernels take)."""
    pos = token_positions(h, w, n_text)
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[:, axis:axis + 1] * omega[None])
    angle = torch.cat(angles, dim=-1).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    table = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))
    return table if device is None else table.to(device)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, heads, L, head_dim] in float32; the result in `dtype`.

    The plain-PyTorch form, for torch.compile (inductor fuses it into one kernel) and for norms whose weights
    ComfyUI casts on use; other eager passes use comfy-kitchen's fused RMSNorm + RoPE (JointAttention).
    """
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([rope[..., 0, 0] * even + rope[..., 0, 1] * odd, rope[..., 1, 0] * even + rope[..., 1, 1] * odd], dim=-1)
    return rotated.flatten(-2).to(dtype)
