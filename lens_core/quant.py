"""Quantised Linear layers for Comfy-Org's `*_mxfp8` DiT files (lens_spec.md §1).

The block-scale layout (cuBLAS "blocked"/swizzled E8M0 scales, one per 32 inputs) is
comfy-kitchen's: we call its `quantize_mxfp8` / `dequantize_mxfp8` / `scaled_mm_mxfp8` rather than
re-deriving the swizzle. Weights stay in float8 (1 byte per weight); each forward either multiplies
in MXFP8 on GPUs that have MXFP8 tensor cores (compute capability 10.x and newer) or dequantises
this one layer's weight to the activation dtype and runs an ordinary matmul.
"""

from __future__ import annotations

import json

import comfy_kitchen
import torch
import torch.nn.functional as F
from torch import nn

MXFP8_FORMAT = "mxfp8"


def comfy_quant_tensor(fmt: str) -> torch.Tensor:
    """The `{name}.comfy_quant` marker tensor: the JSON `{"format": fmt}` as uint8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def read_comfy_quant(marker: torch.Tensor) -> dict:
    return json.loads(bytes(marker.to(torch.uint8).tolist()).decode())


def quantize_linear_mxfp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three tensors an mxfp8 file stores for one Linear weight [out, in] (scales as uint8)."""
    qweight, scales = comfy_kitchen.quantize_mxfp8(weight.float().contiguous())
    return {"weight": qweight, "weight_scale": scales.view(torch.uint8), "comfy_quant": comfy_quant_tensor(MXFP8_FORMAT)}


def _has_mxfp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)


class MXFP8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with E8M0 block scales in comfy-kitchen's layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        blocked_rows = -(-out_features // 128) * 128
        blocked_cols = -(-(in_features // 32) // 4) * 4
        self.register_buffer("weight_scale", torch.empty(blocked_rows, blocked_cols, dtype=torch.float8_e8m0fnu, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return comfy_kitchen.dequantize_mxfp8(self.weight, self.weight_scale, output_type=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if _has_mxfp8_tensor_cores(x.device) and x.dtype == torch.bfloat16:
            flat = x.reshape(-1, self.in_features)
            qx, x_scales = comfy_kitchen.quantize_mxfp8(flat, pad_32x=True)
            out = comfy_kitchen.scaled_mm_mxfp8(qx, self.weight, x_scales, self.weight_scale, bias=bias, out_dtype=x.dtype)
            return out[: flat.shape[0]].reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)
