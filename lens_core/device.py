"""Choosing where and in which precision a model computes."""

from __future__ import annotations

import torch

from .errors import LensInputError

_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                "fp16": torch.float16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise LensInputError(f"unknown dtype {dtype!r}; use one of bf16, fp32.") from None


def resolve_compute(device, dtype, what: str) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) with defaults filled in: bf16 on CUDA, fp32 elsewhere; fp16 is refused."""
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise LensInputError(
            f"float16 is not supported for {what}: Lens overflows in fp16 (NaNs, black images). "
            "Use bf16 (GPUs since NVIDIA Ampere/RTX 30xx) or fp32."
        )
    if dtype not in (torch.bfloat16, torch.float32):
        raise LensInputError(f"dtype {dtype} is not supported for {what}; use bf16 or fp32.")
    return device, dtype
