"""Choosing where and in which precision a model computes.

The device rule of lens_core: a model's work happens on that model's device (`model.device`);
inputs may arrive from any device and are moved there once; results that leave a model as
images, latents or text features are documented where they live (VAE and text-encoder results
on the CPU, `sample()` results on the denoiser's device).
"""

from __future__ import annotations

import logging

import torch

from .errors import LensInputError
from .placement import weight_bytes

log = logging.getLogger("lens_core")

_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                "fp16": torch.float16, "float16": torch.float16}


_CONSTANTS: dict = {}


def constant(values: tuple, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor (a lookup table) on `device`, made once per device: made from a Python list on a
    GPU it would be a blocking host-to-device copy in every call, stalling the queue of kernels."""
    key = (values, torch.device(device), dtype)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def default_device() -> torch.device:
    """The best accelerator torch sees: CUDA (and ROCm, which torch calls cuda), then XPU, then MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _xpu_available():
        return torch.device("xpu")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise LensInputError(f"unknown dtype {dtype!r}; use one of bf16, fp32.") from None


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bfloat16 natively, the reason in words)."""
    if device.type == "cuda":
        if torch.version.hip is not None:
            return True, "ROCm GPU"
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor} >= 8.0)"
        return False, f"{name} has compute capability {major}.{minor}, below the 8.0 (Ampere) that bf16 needs"
    if device.type == "xpu":
        return True, "Intel XPU"
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False, "this macOS / Apple GPU has no bf16 (macOS 14 or newer is needed)"
        return True, "Apple GPU with bf16"
    if device.type == "meta":
        return True, "meta device (shapes only)"
    return False, "CPUs compute fp32 fastest and most exactly"


def parse_device(device) -> torch.device:
    """A device name or object as a torch.device this PyTorch can use, else a LensInputError saying why."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LensInputError(f"device {str(device)[:40]!r} is not a device name; use cuda, cuda:1, xpu, mps or cpu.") from None
    available = {"cuda": torch.cuda.is_available, "xpu": _xpu_available, "mps": _mps_available}.get(device.type)
    if available is not None and not available():
        raise LensInputError(f"device {device} is not available in this PyTorch ({torch.__version__}): a CPU-only build, "
                             "or no driver / GPU found. Install a PyTorch build for your GPU, or use cpu.")
    return device


def resolve_compute(device, dtype, what: str) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) with defaults filled in and checked.

    device None: `default_device()`. dtype None: bf16 where the device computes it natively, fp32
    elsewhere (CPUs, NVIDIA GPUs before Ampere). fp16 is refused (Lens overflows in it), and so is bf16
    on a device that cannot run it; the message names the dtype to use instead.
    """
    device = parse_device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype)
    if dtype == torch.float16:
        raise LensInputError(
            f"float16 is not supported for {what}: Lens overflows in fp16 (NaNs, black images). "
            "Use bf16 (GPUs since NVIDIA Ampere/RTX 30xx) or fp32."
        )
    if dtype not in (None, torch.bfloat16, torch.float32):
        raise LensInputError(f"dtype {dtype} is not supported for {what}; use bf16 or fp32.")
    native_bf16, reason = bf16_support(device)
    if dtype is None:
        dtype = torch.bfloat16 if native_bf16 else torch.float32
        log.info("Lens: %s on %s in %s (auto: %s)", what, device, str(dtype).removeprefix("torch."), reason)
    elif dtype == torch.bfloat16 and not native_bf16 and device.type != "cpu":
        raise LensInputError(f"{what} cannot run in bf16 on {device}: {reason}. Use fp32 on this device (weight dtype fp32).")
    return device, dtype


def describe(what: str, model, runs_on: torch.device | None = None) -> str:
    """One line for the log: which model, how large, in which dtype, where it is and where it computes."""
    size = weight_bytes(getattr(model, "model", model))
    amount = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    place = f"on {model.device}" if runs_on is None or runs_on == model.device else f"held on {model.device}, runs on {runs_on}"
    return f"{what}: {amount} of weights, {str(model.dtype).removeprefix('torch.')}, {place}"
