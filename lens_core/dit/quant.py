"""Quantised Linear layers for Comfy-Org's `*_mxfp8` DiT files (docs/architecture.md, File formats).

The block-scale layout (cuBLAS "blocked"/swizzled E8M0 scales, one per 32 inputs) is
comfy-kitchen's: we call its `quantize_mxfp8` / `dequantize_mxfp8` / `scaled_mm_mxfp8` rather than
re-deriving the swizzle. Weights stay in float8 (1 byte per weight); each forward either multiplies
in MXFP8 on GPUs that have MXFP8 tensor cores (compute capability 10.x and newer) or dequantises
this one layer's weight to the activation dtype and runs an ordinary matmul.
"""

from __future__ import annotations

import json
import logging

import comfy_kitchen
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import gguf_quants
from ..errors import LensFileError

log = logging.getLogger("lens_core")
MXFP8_FORMAT = "mxfp8"


def read_comfy_quant(marker: torch.Tensor, where: str) -> str:
    """The quantisation format a `.comfy_quant` marker names ("?" when it names none)."""
    try:
        declared = json.loads(bytes(marker.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        declared = None
    if not isinstance(declared, dict):
        raise LensFileError(f"{where}: this quantisation marker is not a JSON object. The file is damaged: "
                            "download it again.")
    return str(declared.get("format", "?"))[:40]


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


class GGUFLinear(nn.Module):
    """A Linear whose weight stays in a GGUF quantised format (its raw bytes, uint8 [out, row bytes]) and is
    dequantised on the compute device at every forward, as ComfyUI-GGUF does: the memory (and what block swap
    moves) is the quantised bytes; the price is one dequantisation per layer per forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: int, device=None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("weight", torch.empty(out_features, gguf_quants.row_bytes(qtype, in_features), dtype=torch.uint8,
                                                   device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return gguf_quants.dequantize(self.weight, self.qtype, (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


FP8_WEIGHT_DTYPES = ("fp8_e4m3fn", "fp8_e4m3fn_fast")
FP8_MAX = 448.0  # the largest float8_e4m3fn value
# Layers that stay in the compute dtype under fp8 weights: the modulation layers (a published uint4 study of Lens
# found quantised modulation causes grid artifacts; they are a third of the weights, but they scale every
# activation of a block) and the small top-level layers.
FP8_KEEP = ("img_mod", "txt_mod")


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """NVIDIA Ada (8.9) and newer multiply float8 x float8 natively."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with one float32 scale per output row (computed at load).

    Computes in the activation dtype by dequantising this layer's weight per forward; with `fast` on GPUs
    with fp8 tensor cores, multiplies fp8 x fp8 through `torch._scaled_mm` instead (activations scaled per
    token). A fast path that the GPU or torch build refuses falls back, once, with a log line.
    """

    fast_path_failed = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, fast: bool):
        super().__init__()
        self.in_features, self.out_features, self.fast = in_features, out_features, fast
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool) -> "Fp8Linear":
        module = cls(weight.shape[1], weight.shape[0], bias, fast)
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        module.weight = (w / scale).to(torch.float8_e4m3fn)
        module.weight_scale = scale
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.fast and not Fp8Linear.fast_path_failed and x.dtype == torch.bfloat16 and has_fp8_tensor_cores(x.device):
            try:
                return self._fp8_matmul(x, bias)
            except RuntimeError as e:
                Fp8Linear.fast_path_failed = True
                log.warning("Lens: fp8 x fp8 matmuls are not available here (%s); computing in bf16 instead", e)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _fp8_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        qx = (flat.float() / x_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(qx, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(), out_dtype=x.dtype)
        out = out if bias is None else out + bias
        return out.reshape(*x.shape[:-1], self.out_features)


def fp8_layer_names(model: nn.Module) -> list[str]:
    """The denoiser's block Linears that fp8 weight storage quantises (all but the modulation)."""
    return [name for name, module in model.named_modules()
            if name.startswith("transformer_blocks.") and isinstance(module, (nn.Linear, MXFP8Linear))
            and not any(part in name.split(".") for part in FP8_KEEP)]


def to_fp8_weights(model: nn.Module, fast: bool) -> nn.Module:
    """Replace the block Linears (plain or mxfp8) by Fp8Linear, one layer at a time, in place."""
    for name in fp8_layer_names(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        weight = old.dequantized_weight(torch.float32) if isinstance(old, MXFP8Linear) else old.weight
        setattr(parent, leaf, Fp8Linear.quantize(weight, None if old.bias is None else old.bias.data, fast))
    return model
