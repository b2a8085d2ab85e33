"""The FLUX.2 autoencoder (a KL autoencoder in the ldm layout), sizes read from the checkpoint.

Module names follow the ldm / Comfy-Org `flux2-vae.safetensors` keys; the loader renames
diffusers and BFL files onto them. GroupNorm(32, eps 1e-6) accumulates in float32 (PyTorch's group_norm kernels
take bf16 input and accumulate, normalise and scale in float32, rounding once on output); everything else runs in
the weights' dtype. Layers come from `operations` (torch.nn, or ComfyUI's comfy.ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    z_channels: int = 32
    image_channels: int = 3

    @property
    def downscale(self) -> int:
        """Pixels per VAE latent position (8 for the real model)."""
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int, ops, factory) -> nn.Module:
    return ops.GroupNorm(32, channels, eps=1e-6, **factory)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, ops, factory):
        super().__init__()
        self.norm1 = _norm(cin, ops, factory)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, **factory)
        self.norm2 = _norm(cout, ops, factory)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, **factory)
        self.nin_shortcut = ops.Conv2d(cin, cout, 1, **factory) if cin != cout else None

    def forward(self, x):
        inplace = not torch.is_grad_enabled()  # SiLU over the norm's fresh output: one full-size temporary fewer
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (1x1 convs for q, k, v and the output)."""

    def __init__(self, channels: int, ops, factory):
        super().__init__()
        self.norm = _norm(channels, ops, factory)
        self.q = ops.Conv2d(channels, channels, 1, **factory)
        self.k = ops.Conv2d(channels, channels, 1, **factory)
        self.v = ops.Conv2d(channels, channels, 1, **factory)
        self.proj_out = ops.Conv2d(channels, channels, 1, **factory)

    def forward(self, x):
        b, c, h, w = x.shape
        normed = self.norm(x)
        # Contiguous [B, 1, h*w, C]: a transposed view has a strided last dimension, which sends SDPA to its
        # quadratic-memory math kernel on CPUs and GPUs alike (17 GB for a 2048x2048 decode).
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, ops, factory):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, **factory)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, ops, factory):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, **factory)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(resample_name, resample)


class Mid(nn.Module):
    def __init__(self, channels: int, ops, factory):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, ops, factory)
        self.attn_1 = AttnBlock(channels, ops, factory)
        self.block_2 = ResnetBlock(channels, channels, ops, factory)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, factory):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = ops.Conv2d(cfg.image_channels, cfg.channels, 3, padding=1, **factory)
        levels, cin = [], cfg.channels
        for i, cout in enumerate(widths):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, ops, factory) for j in range(cfg.res_blocks)]
            last = i == len(widths) - 1
            levels.append(Level(blocks, None if last else Downsample(cout, ops, factory), "downsample"))
            cin = cout
        self.down = nn.ModuleList(levels)
        self.mid = Mid(widths[-1], ops, factory)
        self.norm_out = _norm(widths[-1], ops, factory)
        self.conv_out = ops.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1, **factory)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, factory):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = ops.Conv2d(cfg.z_channels, widths[-1], 3, padding=1, **factory)
        self.mid = Mid(widths[-1], ops, factory)
        levels = [None] * len(widths)
        cin = widths[-1]
        for i in reversed(range(len(widths))):
            cout = widths[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, ops, factory) for j in range(cfg.res_blocks + 1)]
            levels[i] = Level(blocks, Upsample(cout, ops, factory) if i != 0 else None, "upsample")
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0], ops, factory)
        self.conv_out = ops.Conv2d(widths[0], cfg.image_channels, 3, padding=1, **factory)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentBatchNorm(nn.Module):
    """`bn`: only the running statistics are used (affine=False); eps 1e-4. Used on the latent's device, wherever the
    statistics live (ComfyUI may leave this small module in CPU memory)."""

    def __init__(self, channels: int, eps: float = 1e-4, device=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels, device=device))
        self.register_buffer("running_var", torch.ones(channels, device=device))

    def _stats(self, x):
        shape = (1, -1, 1, 1)
        mean, var = self.running_mean.to(x.device, torch.float32), self.running_var.to(x.device, torch.float32)
        return mean.view(shape), torch.sqrt(var.view(shape) + self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return (x.float() - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x.float() * std + mean


class FluxVAEModel(nn.Module):
    def __init__(self, cfg: VAEConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        factory = {"device": device, "dtype": dtype}
        self.encoder = Encoder(cfg, operations, factory)
        self.decoder = Decoder(cfg, operations, factory)
        self.quant_conv = operations.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1, **factory)
        self.post_quant_conv = operations.Conv2d(cfg.z_channels, cfg.z_channels, 1, **factory)
        self.bn = LatentBatchNorm(4 * cfg.z_channels, device=device)
