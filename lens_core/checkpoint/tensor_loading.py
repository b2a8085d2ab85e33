"""Filling a model built on the `meta` device from a checkpoint, one tensor at a time.

The model is created without memory (`torch.device("meta")`), then each parameter is read,
converted to its target dtype, moved to its device and put in place. At any moment the process
holds the loaded part of the model plus one tensor in its file dtype: no second full copy, also
when fp32 shards become bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LensFileError, some


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put `tensor` in place of the parameter or buffer `name` of `model`; returns what was put there."""
    module, leaf = _owner(model, name)
    if leaf in module._parameters:
        tensor = module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor
    return tensor


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every parameter and buffer the model needs from a file."""
    named = list(model.named_parameters())
    for module_name, module in model.named_modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and leaf not in module._non_persistent_buffers_set:
                named.append((f"{module_name}.{leaf}" if module_name else leaf, buffer))
    return {name: (tuple(t.shape), t.dtype) for name, t in named}


def check_against_checkpoint(model: nn.Module, keys, shape_of, file_name: str, key_prefix: str = "") -> None:
    """Raise LensFileError naming what is missing or has a contradicting shape."""
    expected = expected_tensors(model)
    missing = [name for name in expected if key_prefix + name not in keys]
    if missing:
        raise LensFileError(
            f"{file_name}: {len(missing)} weights are missing ({some(missing)}). The file is incomplete "
            "(an interrupted download or a missing shard?): download it again."
        )
    for name, (shape, _) in expected.items():
        got = tuple(shape_of(key_prefix + name))
        if got != shape:
            raise LensFileError(
                f"{file_name}: weight {key_prefix + name} has shape {list(got)}, but the other weights "
                f"in the file imply {list(shape)}. The file is inconsistent or from another model."
            )


def missing_numbers(present: set[int], count: int) -> str:
    """Which of the parts numbered 0 .. count-1 (blocks, layers) are absent from `present`: the first few and how
    many in all. The work is bounded by the parts present, not by `count` (a number read from a file: a file
    naming block 100000000 must not make a list that long)."""
    first, number = [], 0
    while len(first) < 5 and number < count:
        if number not in present:
            first.append(str(number))
        number += 1
    absent = count - len({n for n in present if 0 <= n < count})
    return f"{absent:,} of them ({', '.join(first)}{', ...' if absent > len(first) else ''})"


def fill_from_checkpoint(model: nn.Module, read, device, float_dtype: torch.dtype, key_prefix: str = "",
                         dtype_for: dict[str, torch.dtype | None] | None = None,
                         device_for: dict[str, str | torch.device] | None = None) -> nn.Module:
    """Read every tensor the model expects via `read(key, dtype)` and put it in place, on `device`.

    Floating tensors become `float_dtype`, except those named in `dtype_for` (a dtype, or None to keep
    the file's dtype) and those the model declares as 8-bit (quantised weights and scales keep theirs).
    Tensors named in `device_for` go to that device instead (what a model keeps in CPU memory).
    """
    dtype_for, device_for = dtype_for or {}, device_for or {}
    for name, (_, declared) in expected_tensors(model).items():
        keep_storage = declared in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.uint8)
        target = dtype_for.get(name, float_dtype)
        tensor = read(key_prefix + name, None if keep_storage else target)
        if keep_storage and tensor.dtype != declared:
            tensor = tensor.view(declared)
        place_tensor(model, name, tensor.to(device_for.get(name, device)))
    return model.eval()
