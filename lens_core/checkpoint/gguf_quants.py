"""GGUF's quantised tensor formats (llama.cpp's ggml types), decoded in torch on whatever device holds the bytes.

A quantised tensor is stored row by row as blocks: each block of `BLOCK` values takes `BYTES` bytes (scales plus
packed integers). `dequantize(raw, qtype, shape)` turns the raw uint8 bytes [..., row_bytes] into float32 values;
it runs on the compute device inside a GGUF layer's forward, so the weights stay quantised in memory and on the
GPU. The layouts follow llama.cpp's `ggml-quants.c`; tests/test_gguf.py checks every type bit for bit against
`gguf.quants.dequantize` (llama.cpp's own Python library).
"""

from __future__ import annotations

import torch

from ..device import constant

# ggml type id -> (name, values per block, bytes per block)
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136), 39: ("MXFP4", 32, 17),
}
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def type_name(qtype: int) -> str:
    return TYPES[qtype][0] if qtype in TYPES else f"ggml type {qtype}"


def row_bytes(qtype: int, values: int) -> int:
    """Bytes of one row of `values` values (a whole number of blocks)."""
    _, block, size = TYPES[qtype]
    return values // block * size


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: the k low nibbles, then the k high ones (ggml's order within a block)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[n, bytes] little-endian bit fields -> [n, count] 0/1, bit i of the whole field first."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)[..., :count]


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins [n, 8] (ggml's get_scale_min_k4)."""
    q = packed.int()
    low_scales, low_mins = q[:, 0:4] & 63, q[:, 4:8] & 63
    high_scales = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    high_mins = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([low_scales, high_scales], 1).float(), torch.cat([low_mins, high_mins], 1).float()


def _q4_k(b):
    scales, mins = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()  # sub-block 2j: low nibbles, 2j+1: high
    return (_f16(b, 0)[:, :, None] * scales[:, :, None] * q - _f16(b, 2)[:, :, None] * mins[:, :, None]).flatten(1)


def _q5_k(b):
    scales, mins = _k_scales_mins(b[:, 4:16])
    qs = b[:, 48:176].reshape(-1, 4, 32)
    high = _bits(b[:, 16:48, None], 8)  # [n, 32 bytes, 8 bits]: bit s of byte l is the high bit of sub-block s, value l
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32) | (high.transpose(1, 2) << 4)
    return (_f16(b, 0)[:, :, None] * scales[:, :, None] * q.float() - _f16(b, 2)[:, :, None] * mins[:, :, None]).flatten(1)


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8, 1)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, half, 4 quarters, 32]: ql[l], ql[l+32], then their high nibbles
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None]
    q = (low | (((qh >> shifts) & 3) << 4)).float() - 32
    q = q.reshape(-1, 2, 8, 16)  # 16 values per scale
    return (_f16(b, 208)[:, :, None, None] * scales * q).flatten(1)


def _q2_k(b):
    scales = b[:, 0:16].reshape(-1, 2, 4, 2)  # [n, half, shift j, first/second 16 values]
    qs = b[:, 16:80].reshape(-1, 2, 1, 2, 16)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None, None]
    q = ((qs >> shifts) & 3).float()  # [n, half, j, 2, 16]
    d, dmin = _f16(b, 80)[:, :, None, None, None], _f16(b, 82)[:, :, None, None, None]
    return (d * (scales & 0x0F).float()[..., None] * q - dmin * (scales >> 4).float()[..., None]).flatten(1)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed six-bit scales [n, 16]: low 4 bits from bytes 0..7, high 2 bits from bytes 8..11."""
    i = torch.arange(16, device=packed.device)
    low = (packed[:, i % 8].int() >> (4 * (i // 8))) & 0x0F
    high = (packed[:, 8 + i % 4].int() >> (2 * (i // 4))) & 3
    return (low | (high << 4)).float() - 32


def _q3_k(b):
    hmask = _bits(b[:, 0:32, None], 8).transpose(1, 2).reshape(-1, 2, 4, 2, 16)  # bit 4*half + j of each byte
    qs = b[:, 32:96].reshape(-1, 2, 1, 2, 16)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None, None]
    q = ((qs >> shifts) & 3).float() - 4 * (1 - hmask.float())
    scales = _q3_k_scales(b[:, 96:108]).reshape(-1, 2, 4, 2, 1)
    return (_f16(b, 108)[:, :, None, None, None] * scales * q).flatten(1)


def _iq4_nl(b):
    table = constant(IQ4_VALUES, b.device)
    return _f16(b, 0) * table[_nibbles(b[:, 2:]).long()]


def _iq4_xs(b):
    table = constant(IQ4_VALUES, b.device)
    i = torch.arange(8, device=b.device)
    scales_high = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF
    low = (b[:, 4 + i // 2].int() >> (4 * (i % 2))) & 0x0F
    high = (scales_high >> (2 * i)) & 3
    dl = _f16(b, 0) * ((low | (high << 4)).float() - 32)  # [n, 8]
    q = _nibbles(b[:, 8:136].reshape(-1, 8, 16))  # [n, 8, 32]
    return (dl[:, :, None] * table[q.long()]).flatten(1)


def _mxfp4(b):
    """GPT-OSS's experts in llama.cpp's layout: an E8M0 scale byte (2^(e-127)), then 16 bytes of E2M1 codes, the low
    nibbles holding the block's first 16 values (the HF files interleave them instead: text/experts.py)."""
    table = constant(FP4_VALUES, b.device)
    return torch.exp2(b[:, :1].float() - 127) * table[_nibbles(b[:, 1:]).long()]


_DECODERS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
             20: _iq4_nl, 23: _iq4_xs, 39: _mxfp4}


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bytes of a tensor of ggml type `qtype` -> float32 values of `shape` (on the bytes' device)."""
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[qtype]).float().reshape(shape)
    _, _, size = TYPES[qtype]
    return _DECODERS[qtype](raw.reshape(-1, size)).reshape(shape)
