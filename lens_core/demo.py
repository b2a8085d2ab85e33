"""Tiny random Lens models built in memory: the whole pipeline runs offline in seconds, no weights.

The images are noise-like (the weights are random); what the demo shows is that every stage
(tokenizer, Harmony template, GPT-OSS features, DiT sampling, VAE decode, PNG writing) works here.
"""

from __future__ import annotations

import torch
from torch import nn

from .dit.model import DiTConfig, LensDiT
from .text.gpt_oss import GptOssConfig, GptOssEncoder
from .text.tokenizer import load_tokenizer
from .vae.autoencoder import LensVAE
from .vae.model import FluxVAEModel, VAEConfig

DEMO_TEXT = GptOssConfig(hidden=64, layers=24, heads=4, kv_heads=2, head_dim=16, experts=4, experts_per_token=2,
                         expert_hidden=64, sliding_window=16)
DEMO_DIT = DiTConfig(hidden=128, heads=2, blocks=2, mlp_hidden=341, text_width=64, text_layers=4)
DEMO_VAE = VAEConfig(channels=32, channel_mult=(1, 1, 2, 2), res_blocks=1, z_channels=32)


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)


def demo_dit(seed: int = 0) -> LensDiT:
    model = LensDiT(DEMO_DIT).eval()
    _randomise(model, torch.Generator().manual_seed(seed))
    return model


def demo_text_encoder(seed: int = 1) -> GptOssEncoder:
    model = GptOssEncoder(DEMO_TEXT).eval()  # dense expert banks
    _randomise(model, torch.Generator().manual_seed(seed))
    model.identity = f"demo-text-encoder-{seed}"
    return model


def demo_vae(seed: int = 2) -> LensVAE:
    model = FluxVAEModel(DEMO_VAE)
    _randomise(model, torch.Generator().manual_seed(seed))
    return LensVAE(model, source="demo")


def demo_models():
    """(dit, text_encoder, tokenizer, vae), all tiny and random except the real (bundled) tokenizer."""
    return demo_dit(), demo_text_encoder(), load_tokenizer(), demo_vae()
