"""llama.cpp's ggml block formats, decoded in torch on whatever device holds the bytes, straight into the dtype asked for.

A quantised row is a run of blocks: each block of `values` values takes `nbytes` bytes (float16 scales plus packed
integers). Every decoder takes the raw bytes as [n blocks, nbytes] uint8 and returns [n blocks, values]. The integer
work stays in integers and the per-block scales are computed in float32 (a few per block); only the multiply of the
values by their scale (plus the minimum, for the types that have one) happens in the target dtype, so a bf16 model
never makes a float32 copy of a weight, and a bf16 value is off the float32 one by the rounding of its scale and of
the product. In float32 the result is bit for bit what llama.cpp's own `gguf.quants.dequantize` gives
(tests/test_gguf.py). Layouts follow llama.cpp's `ggml-quants.c`.

`SCALE_BYTES` says where each block keeps its float16 scales: the values are finite exactly when those are, since
the rest of a block is small integers. That is the cheap validity check a loader runs instead of decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import constant

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP4_TWICE = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values x 2: whole numbers


def _byte_pairs(values: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """For every byte, the values of its low and its high nibble: one lookup decodes two values."""
    return tuple((values[byte & 0x0F], values[byte >> 4]) for byte in range(256))


IQ4_PAIRS, FP4_TWICE_PAIRS = _byte_pairs(IQ4_VALUES), _byte_pairs(FP4_TWICE)


@dataclass(frozen=True)
class BlockType:
    """One ggml type: its name, values and bytes per block, and where its float16 scales sit in a block."""

    name: str
    values: int
    nbytes: int
    scale_bytes: tuple[int, ...]  # byte offsets of the block's float16 scales (empty: MXFP4 has an E8M0 byte)


TYPES = {
    2: BlockType("Q4_0", 32, 18, (0,)), 3: BlockType("Q4_1", 32, 20, (0, 2)), 6: BlockType("Q5_0", 32, 22, (0,)),
    7: BlockType("Q5_1", 32, 24, (0, 2)), 8: BlockType("Q8_0", 32, 34, (0,)), 10: BlockType("Q2_K", 256, 84, (80, 82)),
    11: BlockType("Q3_K", 256, 110, (108,)), 12: BlockType("Q4_K", 256, 144, (0, 2)), 13: BlockType("Q5_K", 256, 176, (0, 2)),
    14: BlockType("Q6_K", 256, 210, (208,)), 20: BlockType("IQ4_NL", 32, 18, (0,)), 23: BlockType("IQ4_XS", 256, 136, (0,)),
    39: BlockType("MXFP4", 32, 17, ()),
}
FLOAT_TYPES = {0: ("F32", torch.float32), 1: ("F16", torch.float16), 30: ("BF16", torch.bfloat16)}
OTHER_TYPE_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S",
                    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}


def type_name(qtype: int) -> str:
    if qtype in TYPES:
        return TYPES[qtype].name
    if qtype in FLOAT_TYPES:
        return FLOAT_TYPES[qtype][0]
    return OTHER_TYPE_NAMES.get(qtype, f"ggml type {qtype}")


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n, 1] (exact)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _times(scale: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale (float32, per block) x q (small integers) in `dtype`, multiplied in place: the decoders run once per layer
    per forward, and on the CPU each new weight-sized tensor costs as much as the arithmetic (fresh pages)."""
    return q.to(dtype).mul_(scale.to(dtype))


def _nibble_values(pairs: tuple, packed: torch.Tensor, dtype: torch.dtype, interleaved: bool = False) -> torch.Tensor:
    """Bytes [..., k] of two 4-bit codes -> [..., 2k] table values (`_byte_pairs`) in `dtype`. `interleaved`: byte j holds
    values 2j (low nibble) and 2j+1; else the low nibbles are values 0..k-1 and the high ones k..2k-1 (ggml's order).

    One int8 lookup per byte, indexed with int32: a lookup per value with int64 indices cost the CPU about twice as much."""
    table = constant(pairs, packed.device, torch.int8)
    found = table.index_select(0, packed.flatten().int()).view(*packed.shape, 2)
    if interleaved:
        return found.flatten(-2).to(dtype)
    values = torch.empty(*packed.shape[:-1], 2, packed.shape[-1], dtype=dtype, device=packed.device)
    return values.copy_(found.transpose(-1, -2)).flatten(-2)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: the k low nibbles, then the k high ones (ggml's order within a block)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[..., bytes] little-endian bit fields -> [..., count] 0/1 (uint8), bit i of the whole field first."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)[..., :count]


def _q8_0(b, dtype):
    return _times(_f16(b, 0), b[:, 2:].contiguous().view(torch.int8), dtype)


def _q4_0(b, dtype):
    return _times(_f16(b, 0), _nibbles(b[:, 2:]).to(torch.int8) - 8, dtype)


def _q4_1(b, dtype):
    return _times(_f16(b, 0), _nibbles(b[:, 4:]), dtype).add_(_f16(b, 2).to(dtype))


def _q5_0(b, dtype):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _times(_f16(b, 0), q.to(torch.int8) - 16, dtype)


def _q5_1(b, dtype):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _times(_f16(b, 0), q, dtype).add_(_f16(b, 2).to(dtype))


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, float32 [n, 8, 1] (ggml's get_scale_min_k4)."""
    q = packed
    low_scales, low_mins = q[:, 0:4] & 63, q[:, 4:8] & 63
    high_scales = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    high_mins = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([low_scales, high_scales], 1).float()[:, :, None], torch.cat([low_mins, high_mins], 1).float()[:, :, None]


def _k_affine(b, q: torch.Tensor, dtype) -> torch.Tensor:
    """d * scale_j * q - dmin * min_j over the 8 sub-blocks of 32 values (Q4_K, Q5_K); q [n, 8, 32] integers."""
    scales, mins = _k_scales_mins(b[:, 4:16])
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    return _times(d * scales, q, dtype).sub_((dmin * mins).to(dtype)).flatten(1)


def _q4_k(b, dtype):
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)  # sub-block 2j: low nibbles, 2j+1: high
    return _k_affine(b, q, dtype)


def _q5_k(b, dtype):
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    # Byte l of qh holds the high bit of value l of every sub-block: bit s for sub-block s.
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]
    high = (b[:, 16:48][:, None, :] >> shifts) & 1  # [n, 8 sub-blocks, 32 values]
    return _k_affine(b, q | (high << 4), dtype)


def _q6_k(b, dtype):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8, 1)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, half, 4 quarters, 32]: ql[l], ql[l+32], then their high nibbles
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None]
    q = ((low | (((qh >> shifts) & 3) << 4)).to(torch.int8) - 32).reshape(-1, 2, 8, 16)  # 16 values per scale
    return _times(_f16(b, 208)[:, :, None, None] * scales, q, dtype).flatten(1)


def _q2_k(b, dtype):
    scales = b[:, 0:16].reshape(-1, 2, 4, 2)  # [n, half, shift j, first/second 16 values]
    qs = b[:, 16:80].reshape(-1, 2, 1, 2, 16)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None, None]
    q = (qs >> shifts) & 3  # [n, half, j, 2, 16]
    d, dmin = _f16(b, 80)[:, :, None, None, None], _f16(b, 82)[:, :, None, None, None]
    scale, minimum = d * (scales & 0x0F).float()[..., None], dmin * (scales >> 4).float()[..., None]
    return _times(scale, q, dtype).sub_(minimum.to(dtype)).flatten(1)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed six-bit scales, float32 [n, 16]: low 4 bits from bytes 0..7, high 2 bits from bytes 8..11."""
    i = torch.arange(16, device=packed.device)
    low = (packed[:, i % 8].int() >> (4 * (i // 8))) & 0x0F
    high = (packed[:, 8 + i % 4].int() >> (2 * (i // 4))) & 3
    return ((low | (high << 4)) - 32).float()


def _q3_k(b, dtype):
    hmask = _bits(b[:, 0:32, None], 8).transpose(1, 2).reshape(-1, 2, 4, 2, 16)  # bit 4*half + j of each byte
    qs = b[:, 32:96].reshape(-1, 2, 1, 2, 16)
    shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[None, None, :, None, None]
    q = ((qs >> shifts) & 3).to(torch.int8) - 4 * (1 - hmask.to(torch.int8))
    scales = _q3_k_scales(b[:, 96:108]).reshape(-1, 2, 4, 2, 1)
    return _times(_f16(b, 108)[:, :, None, None, None] * scales, q, dtype).flatten(1)


def _iq4_nl(b, dtype):
    return _times(_f16(b, 0), _nibble_values(IQ4_PAIRS, b[:, 2:], dtype), dtype)


def _iq4_xs(b, dtype):
    i = torch.arange(8, device=b.device)
    scales_high = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF
    low = (b[:, 4 + i // 2].int() >> (4 * (i % 2))) & 0x0F
    high = (scales_high >> (2 * i)) & 3
    dl = _f16(b, 0) * ((low | (high << 4)) - 32).float()  # [n, 8]
    return _times(dl[:, :, None], _nibble_values(IQ4_PAIRS, b[:, 8:136].reshape(-1, 8, 16), dtype), dtype).flatten(1)


def mxfp4_values(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, interleaved: bool) -> torch.Tensor:
    """MXFP4 blocks of 32 values: codes [..., 16] uint8 (two E2M1 codes a byte), scales [...] uint8 (E8M0, 2^(s-127))
    -> [..., 32]. `interleaved`: byte k holds values 2k (low nibble) and 2k+1, as in OpenAI's / Microsoft's files;
    else the low nibbles hold values 0..15 and the high ones 16..31, as in llama.cpp's. The codes are looked up as
    twice their value (whole numbers) and the scale halved: the same products, exactly."""
    scale = torch.exp2(scales.to(torch.float32) - 128)[..., None]
    return _times(scale, _nibble_values(FP4_TWICE_PAIRS, codes, dtype, interleaved), dtype)


def _mxfp4(b, dtype):
    return mxfp4_values(b[:, 1:], b[:, 0], dtype, interleaved=False)


_DECODERS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
             20: _iq4_nl, 23: _iq4_xs, 39: _mxfp4}


def decode_blocks(raw: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """Raw bytes [..., whole blocks] of ggml type `qtype` -> values [..., values] in `dtype` (on the bytes' device)."""
    block = TYPES[qtype]
    rows = raw.shape[:-1]
    return _DECODERS[qtype](raw.reshape(-1, block.nbytes), dtype).reshape(*rows, -1)


def scales_finite(raw: torch.Tensor, qtype: int) -> bool:
    """Whether every block's scales are finite (so are its values) without decoding: the float16 scale fields, or for
    MXFP4 the E8M0 byte (255 is NaN)."""
    block = TYPES[qtype]
    blocks = raw.reshape(-1, block.nbytes)
    if not block.scale_bytes:
        return not bool((blocks[:, 0] == 0xFF).any())
    fields = torch.cat([blocks[:, at:at + 2] for at in block.scale_bytes], dim=1).contiguous().view(torch.int16)
    return not bool(((fields & 0x7C00) == 0x7C00).any())  # exponent all ones: inf or NaN
