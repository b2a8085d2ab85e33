"""3-axis rotary position embedding of the Lens DiT (adjacent-pair rotation, lens_spec.md §1).

Positions, per token of the joint sequence [image ; text]:
- image token (r, c) of an h x w grid: (0, r - (h - h//2), c - (w - w//2)): centred, an odd
  size gets the extra negative position;
- text token j: (s + j, s + j, s + j) with s = max(h//2, w//2), i.e. after the image's half-size.
"""

from __future__ import annotations

import torch


def token_positions(h: int, w: int, n_text: int, device=None) -> torch.Tensor:
    """[h*w + n_text, 3] float32 positions (frame, row, column) of the joint sequence."""
    rows = torch.arange(h, dtype=torch.float32, device=device) - (h - h // 2)
    cols = torch.arange(w, dtype=torch.float32, device=device) - (w - w // 2)
    img = torch.stack(
        [torch.zeros(h, w, device=device), rows[:, None].expand(h, w), cols[None, :].expand(h, w)], dim=-1
    ).reshape(h * w, 3)
    start = max(h // 2, w // 2)
    txt = (start + torch.arange(n_text, dtype=torch.float32, device=device))[:, None].expand(n_text, 3)
    return torch.cat([img, txt], dim=0)


def rope_frequencies(h: int, w: int, n_text: int, axes_dims, device=None) -> torch.Tensor:
    """[L, head_dim/2, 2] float32 (cos, sin) of the rotation angle of every channel pair, for every token of the
    joint sequence; the last axis doubles as a complex number e^(i*angle) (`torch.view_as_complex`)."""
    pos = token_positions(h, w, n_text, device)
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles.append(pos[:, axis:axis + 1].double() * omega[None])
    angle = torch.cat(angles, dim=-1).float()
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, heads, L, head_dim] in float32; the result in `dtype`.

    Eager: one complex multiply on views, (x_2i + i*x_2i+1) * e^(i*angle). Under torch.compile: the same rotation
    in real arithmetic, which inductor fuses into one kernel (it generates no code for complex numbers).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        even, odd = pairs.unbind(-1)
        cos, sin = rope.unbind(-1)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rope))
    return rotated.flatten(-2).to(dtype)
