"""Every packed weight format the pack reads, in one registry: how a matrix is stored, decoded and cheaply checked.

A packed [rows, cols] matrix is a few tensors ("parts"): always `weight`, plus format-specific scales. Every part is
stored as an integer tensor (float8 and float32 scales as same-size integer views), so a cast of a whole model
(`model.to(torch.bfloat16)`) leaves the encoding alone. Each format:
- `shapes(rows, cols)`: the parts' shapes and storage dtypes (to build empty layers before reading a file);
- `decode(parts, rows, cols, dtype)`: the values, straight in the compute dtype, on the parts' device;
- `finite(parts)`: whether the values are all finite, judged from the scales (and fp8 codes) without decoding;
- `linear(x, parts, bias)`: a fused matmul on hardware that has one, else None.

Formats: llama.cpp's GGUF block types (gguf_blocks.py), OpenAI's MXFP4 (the HF files' expert banks), Comfy-Org's
NVFP4 (text encoder experts) and MXFP8 (denoiser) in comfy-kitchen's layouts, the pack's own fp8 with one scale per
row (weight dtype fp8_e4m3fn), and dense float weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy_kitchen
import torch

from ..errors import all_finite
from . import gguf_blocks

log = logging.getLogger("lens_core")
FP8_MAX = 448.0  # the largest float8_e4m3fn value
_E4M3_NAN = 0x7F  # float8_e4m3fn has no infinity; NaN is S.1111.111
_fp8_matmul_refused = False  # set once torch._scaled_mm has failed here


def _no_fp8_nan(codes: torch.Tensor) -> bool:
    return not bool(((codes & _E4M3_NAN) == _E4M3_NAN).any())


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """NVIDIA Ada (compute capability 8.9) and newer multiply float8 x float8 natively."""
    return _cuda_capability(torch.device(device)) >= (8, 9)


@dataclass(frozen=True)
class PackedFormat:
    """The interface every format implements (see the module docstring)."""

    name: str

    def shapes(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def finite(self, parts: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor | None:
        return None


@dataclass(frozen=True)
class Dense(PackedFormat):
    """Plain float weights (expert banks of bf16 / fp32 files); `storage` is the file's dtype."""

    storage: torch.dtype = torch.bfloat16

    def shapes(self, rows, cols):
        return {"weight": ((rows, cols), self.storage)}

    def decode(self, parts, rows, cols, dtype):
        return parts["weight"].to(dtype)

    def finite(self, parts):
        return all_finite(parts["weight"])


@dataclass(frozen=True)
class GGUFBlocks(PackedFormat):
    """One of llama.cpp's block types: each row is whole blocks of raw bytes."""

    qtype: int = 8

    @property
    def block(self) -> gguf_blocks.BlockType:
        return gguf_blocks.TYPES[self.qtype]

    def row_bytes(self, cols: int) -> int:
        return cols // self.block.values * self.block.nbytes

    def shapes(self, rows, cols):
        return {"weight": ((rows, self.row_bytes(cols)), torch.uint8)}

    def decode(self, parts, rows, cols, dtype):
        return gguf_blocks.decode_blocks(parts["weight"], self.qtype, dtype).reshape(rows, cols)

    def finite(self, parts):
        return gguf_blocks.scales_finite(parts["weight"], self.qtype)


@dataclass(frozen=True)
class MXFP4(PackedFormat):
    """OpenAI's MXFP4 as in the HF files: `weight` [rows, cols/2] two E2M1 codes a byte (low nibble = even value),
    `weight_scale` [rows, cols/32] E8M0 bytes, one per 32 values."""

    def shapes(self, rows, cols):
        return {"weight": ((rows, cols // 2), torch.uint8), "weight_scale": ((rows, cols // 32), torch.uint8)}

    def decode(self, parts, rows, cols, dtype):
        codes = parts["weight"].reshape(rows, cols // 32, 16)
        return gguf_blocks.mxfp4_values(codes, parts["weight_scale"], dtype, interleaved=True).reshape(rows, cols)

    def finite(self, parts):
        return not bool((parts["weight_scale"] == 0xFF).any())


def _blocked(rows: int, cols: int) -> tuple[int, int]:
    """cuBLAS's "blocked" scale layout pads rows to 128 and columns to 4 (comfy-kitchen's to_blocked)."""
    return -(-rows // 128) * 128, -(-cols // 4) * 4


@dataclass(frozen=True)
class NVFP4(PackedFormat):
    """Comfy-Org's NVFP4: `weight` [rows, cols/2] E2M1 codes (high nibble = even value), `weight_scale` float8_e4m3fn
    block scales (one per 16 values, blocked layout, as uint8), `weight_scale_2` one float32 scale (as int32)."""

    def shapes(self, rows, cols):
        return {"weight": ((rows, cols // 2), torch.uint8), "weight_scale": (_blocked(rows, cols // 16), torch.uint8),
                "weight_scale_2": ((), torch.int32)}

    def decode(self, parts, rows, cols, dtype):
        return comfy_kitchen.dequantize_nvfp4(parts["weight"], parts["weight_scale_2"].view(torch.float32),
                                              parts["weight_scale"].view(torch.float8_e4m3fn), output_type=dtype)

    def finite(self, parts):
        return _no_fp8_nan(parts["weight_scale"]) and all_finite(parts["weight_scale_2"].view(torch.float32))


@dataclass(frozen=True)
class MXFP8(PackedFormat):
    """Comfy-Org's MXFP8: `weight` float8_e4m3fn [rows, cols], `weight_scale` E8M0 bytes (one per 32 inputs, blocked
    layout). Multiplied in MXFP8 on GPUs that have it (compute capability 10 and newer)."""

    def shapes(self, rows, cols):
        return {"weight": ((rows, cols), torch.uint8), "weight_scale": (_blocked(rows, cols // 32), torch.uint8)}

    def decode(self, parts, rows, cols, dtype):
        return comfy_kitchen.dequantize_mxfp8(parts["weight"].view(torch.float8_e4m3fn),
                                              parts["weight_scale"].view(torch.float8_e8m0fnu), output_type=dtype)

    def finite(self, parts):
        return _no_fp8_nan(parts["weight"]) and not bool((parts["weight_scale"] == 0xFF).any())

    def linear(self, x, parts, bias):
        if x.dtype != torch.bfloat16 or _cuda_capability(x.device) < (10, 0):
            return None
        flat = x.reshape(-1, x.shape[-1])
        qx, x_scales = comfy_kitchen.quantize_mxfp8(flat, pad_32x=True)
        out = comfy_kitchen.scaled_mm_mxfp8(qx, parts["weight"].view(torch.float8_e4m3fn), x_scales,
                                            parts["weight_scale"].view(torch.float8_e8m0fnu), bias=bias, out_dtype=x.dtype)
        return out[: flat.shape[0]].reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class FP8Rows(PackedFormat):
    """The pack's fp8 storage (weight dtype fp8_e4m3fn): `weight` float8_e4m3fn [rows, cols], `weight_scale` one float32
    per row (as int32). `fast`: multiply fp8 x fp8 on GPUs with fp8 tensor cores (compute capability 8.9+)."""

    fast: bool = False

    def shapes(self, rows, cols):
        return {"weight": ((rows, cols), torch.uint8), "weight_scale": ((rows, 1), torch.int32)}

    def decode(self, parts, rows, cols, dtype):
        return parts["weight"].view(torch.float8_e4m3fn).to(dtype) * parts["weight_scale"].view(torch.float32).to(dtype)

    def finite(self, parts):
        return _no_fp8_nan(parts["weight"]) and all_finite(parts["weight_scale"].view(torch.float32))

    def linear(self, x, parts, bias):
        global _fp8_matmul_refused
        if not self.fast or x.dtype != torch.bfloat16 or not has_fp8_tensor_cores(x.device) or _fp8_matmul_refused:
            return None
        flat = x.reshape(-1, x.shape[-1])
        x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        try:
            out = torch._scaled_mm((flat.float() / x_scale).to(torch.float8_e4m3fn), parts["weight"].view(torch.float8_e4m3fn).t(),
                                   scale_a=x_scale, scale_b=parts["weight_scale"].view(torch.float32).t(), out_dtype=x.dtype)
        except RuntimeError as e:  # a GPU or build without it: once, then the dequantised path
            _fp8_matmul_refused = True
            log.warning("Lens: fp8 x fp8 matmuls are not available here (%s); computing in bf16 instead", e)
            return None
        out = out if bias is None else out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of `weight` [rows, cols] in this format: each row scaled so its largest value is FP8_MAX."""
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        return {"weight": (w / scale).to(torch.float8_e4m3fn).view(torch.uint8), "weight_scale": scale.view(torch.int32)}


MXFP4_HF = MXFP4("mxfp4")
NVFP4_COMFY = NVFP4("nvfp4")
MXFP8_COMFY = MXFP8("mxfp8")
FP8_ROWS = {False: FP8Rows("fp8_e4m3fn", fast=False), True: FP8Rows("fp8_e4m3fn_fast", fast=True)}
COMFY_QUANT = {"mxfp8": MXFP8_COMFY, "nvfp4": NVFP4_COMFY}  # a `.comfy_quant` marker's format -> ours


def gguf(qtype: int) -> PackedFormat:
    """The format of a GGUF tensor of ggml type `qtype` (one of gguf_blocks.TYPES)."""
    return GGUFBlocks(gguf_blocks.TYPES[qtype].name, qtype)


def dense(storage: torch.dtype) -> PackedFormat:
    return Dense(f"dense {str(storage).removeprefix('torch.')}", storage)


def fp8_rows(fast: bool) -> FP8Rows:
    return FP8_ROWS[fast]


