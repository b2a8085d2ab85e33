"""GPT-OSS expert banks kept in their packed file format and dequantised one expert at a time.

Dequantised to bf16 the 24 layers x 32 experts are ~38 GB; packed they are ~12 GB. The encoder
only needs the experts its tokens are routed to, so each bank hands out `weight(e)` -> [out, in]
for a single expert, decoded on the spot, on the device that asks (a bank kept in CPU memory sends only
that expert's packed bytes over: expert streaming). Formats:
- MXFP4 (Microsoft/OpenAI HF files): `*_blocks` uint8 [E, out, G, 16] (two E2M1 codes per byte,
  low nibble = even element) + `*_scales` uint8 [E, out, G] (E8M0: 2^(s-127)), 32 values per block.
- NVFP4 (Comfy-Org's file): packed uint8 [E, out, in/2] (high nibble = even element), swizzled
  float8 block scales and a per-expert float32 scale, decoded by comfy-kitchen.
- Dense: a float tensor [E, out, in], or HF's transposed [E, in, out].
- GGUF (llama.cpp's files): any GGUF block format, MXFP4 above all (a scale byte, then 16 bytes of codes with the
  first 16 values in the low nibbles), gate and up stored as two banks (`InterleavedBank`).
"""

from __future__ import annotations

import comfy_kitchen
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import gguf_quants
from ..checkpoint.gguf_quants import FP4_VALUES
from ..device import constant
from ..errors import LensFileError


def _byte_table(device) -> torch.Tensor:
    """[256, 2] float32: the two FP4 values a byte holds, low nibble (even element) first."""
    lut = constant(FP4_VALUES, device)
    byte = torch.arange(256, device=device)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1).contiguous()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8 + scales [..., G] uint8 (E8M0) -> [..., G*32] values.

    The byte -> value-pair lookup is an embedding lookup: the fastest gather PyTorch has on CPUs
    (measured 0.038 s per 5760x2880 bank on 2 cores, against 0.050 s for plain indexing).
    """
    values = F.embedding(blocks.int(), _byte_table(blocks.device)).view(*blocks.shape[:-1], 32)
    values *= torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2).to(dtype)


class _Bank(nn.Module):
    """What every bank format shares: its packed tensors are registered buffers, so moves, casts of the float
    ones, `state_dict` and byte counts treat them like any other weight."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


class MXFP4Bank(_Bank):
    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        super().__init__(blocks=blocks, scales=scales)
        self.num_experts, self.out_features = blocks.shape[:2]
        self.in_features = blocks.shape[2] * 32

    def weight(self, expert: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        device = device or self.blocks.device
        return dequantize_mxfp4(self.blocks[expert].to(device, non_blocking=True), self.scales[expert].to(device, non_blocking=True),
                                torch.float32).to(dtype)


class NVFP4Bank(_Bank):
    """The float8 block scales and float32 expert scales are kept as same-size integer views: a cast of the model
    (`encoder.to(torch.bfloat16)`) converts float buffers, which would destroy their encoding, and leaves integers."""

    def __init__(self, packed: torch.Tensor, block_scales: torch.Tensor, expert_scales: torch.Tensor):
        super().__init__(packed=packed, block_scale_bits=block_scales.view(torch.uint8),
                         expert_scale_bits=expert_scales.float().view(torch.int32))
        self.block_scale_dtype = block_scales.dtype
        self.num_experts, self.out_features = packed.shape[:2]
        self.in_features = packed.shape[2] * 2

    def weight(self, expert: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        device = device or self.packed.device
        return comfy_kitchen.dequantize_nvfp4(
            self.packed[expert].to(device, non_blocking=True), self.expert_scale_bits[expert].view(torch.float32).to(device),
            self.block_scale_bits[expert].to(device, non_blocking=True).view(self.block_scale_dtype), output_type=torch.float32
        ).to(dtype)


class DenseBank(_Bank):
    def __init__(self, weights: torch.Tensor, transposed: bool):
        super().__init__(weights=weights)
        self.transposed = transposed
        self.num_experts = weights.shape[0]
        self.out_features, self.in_features = (weights.shape[2], weights.shape[1]) if transposed else weights.shape[1:]

    def weight(self, expert: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        w = self.weights[expert].to(device or self.weights.device, non_blocking=True)
        return (w.T if self.transposed else w).to(dtype)


class GGUFBank(_Bank):
    """A bank in any GGUF block format (llama.cpp's MXFP4 for GPT-OSS, or Q8_0 ... in other quantisations): raw bytes
    [E, out, row bytes], one expert decoded at a time by checkpoint/gguf_quants.py."""

    def __init__(self, raw: torch.Tensor, qtype: int, in_features: int):
        super().__init__(raw=raw)
        self.qtype, self.in_features = qtype, in_features
        self.num_experts, self.out_features = raw.shape[:2]

    def weight(self, expert: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        raw = self.raw[expert].to(device or self.raw.device, non_blocking=True)
        return gguf_quants.dequantize(raw, self.qtype, (self.out_features, self.in_features)).to(dtype)


class InterleavedBank(nn.Module):
    """The gate and up projections, stored apart (llama.cpp splits GPT-OSS's fused gate_up), handed out as the fused
    bank the MoE expects: rows alternate gate, up (HF's `gate_up_proj` order)."""

    def __init__(self, gate: nn.Module, up: nn.Module):
        super().__init__()
        self.gate, self.up = gate, up
        self.num_experts, self.in_features, self.out_features = gate.num_experts, gate.in_features, 2 * gate.out_features

    def weight(self, expert: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        gate, up = self.gate.weight(expert, dtype, device), self.up.weight(expert, dtype, device)
        return torch.stack([gate, up], dim=1).reshape(self.out_features, self.in_features)


def check_banks(encoder: nn.Module, file_name: str) -> None:
    """Every layer's banks have the shapes the encoder's config implies (else the file is another model's)."""
    cfg = encoder.config
    for i, layer in enumerate(encoder.layers):
        for bank, expected in ((layer.mlp.gate_up, (cfg.experts, 2 * cfg.expert_hidden, cfg.hidden)),
                               (layer.mlp.down, (cfg.experts, cfg.hidden, cfg.expert_hidden))):
            got = (bank.num_experts, bank.out_features, bank.in_features)
            if got != expected:
                raise LensFileError(f"{file_name}: layer {i} expert bank is {list(got)} (experts, out, in), expected "
                                    f"{list(expected)}.")
