"""Filling a model built on the `meta` device from a tensor source, one tensor at a time.

The model is created without memory (`torch.device("meta")`), then each parameter is read, converted to its target
dtype, moved to its device and put in place. At any moment the process holds the loaded part of the model plus one
tensor in its file dtype: no second full copy, also when fp32 shards become bf16. Packed layers (quant/layers.py)
declare integer parts: those are read as stored and reinterpreted bit for bit (float8 codes and scales as bytes),
then checked from their scales (format.finite) without decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LensFileError, some
from ..quant.layers import PackedLayer
from .files import short


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
    """Raise LensFileError naming what is missing or has a contradicting shape. `shape_of(key, packed)`: the shape of the
    values, or for a packed layer's part (`packed`) the shape as stored."""
    expected = expected_tensors(model)
    missing = [name for name in expected if key_prefix + name not in keys]
    if missing:
        raise LensFileError(
            f"{file_name}: {len(missing)} weights are missing ({some(missing)}). The file is incomplete "
            "(an interrupted download or a missing shard?): download it again."
        )
    for name, (shape, declared) in expected.items():
        got = tuple(shape_of(key_prefix + name, not declared.is_floating_point))
        if got != shape:
            raise LensFileError(
                f"{file_name}: weight {short(key_prefix + name)} has shape {list(got)[:8]}, but the other weights "
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


def _stored_as(tensor: torch.Tensor, declared: torch.dtype, shape: tuple[int, ...], key: str, file_name: str) -> torch.Tensor:
    """A packed part read as stored, reinterpreted as the layer declares it (float8 as uint8, float32 as int32)."""
    if tensor.element_size() != torch.empty(0, dtype=declared).element_size() or tensor.numel() != _numel(shape):
        raise LensFileError(f"{file_name}: {short(key)} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)[:8]}, "
                            f"which does not fit a packed layer of {list(shape)}. The file is damaged or from another model.")
    return tensor.contiguous().view(declared).reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def fill_from_checkpoint(model: nn.Module, read, device, float_dtype: torch.dtype, key_prefix: str = "",
                         dtype_for: dict[str, torch.dtype | None] | None = None,
                         device_for: dict[str, str | torch.device] | None = None, file_name: str = "") -> nn.Module:
    """Read every tensor the model expects via `read(key, dtype)` and put it in place, on `device`.

    Floating tensors become `float_dtype`, except those named in `dtype_for` (a dtype, or None to keep the file's
    dtype); integer ones (packed parts) are read as stored (`read(key, None)`) and reinterpreted. Tensors named in
    `device_for` go to that device instead. Packed layers are then checked for NaN from their scales.
    """
    dtype_for, device_for = dtype_for or {}, device_for or {}
    for name, (shape, declared) in expected_tensors(model).items():
        key = key_prefix + name
        if declared.is_floating_point:
            tensor = read(key, dtype_for.get(name, float_dtype))
        else:
            tensor = _stored_as(read(key, None), declared, shape, key, file_name)
        place_tensor(model, name, tensor.to(device_for.get(name, device)))
    check_packed_layers(model, file_name)
    return model.eval()


def check_packed_layers(model: nn.Module, file_name: str) -> None:
    """Every packed layer's values are finite, judged from its scales (no decode)."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLayer) and not module.packed_finite():
            raise LensFileError(f"{file_name}: layer {short(name)} ({module.format.name}) holds NaN or infinite values, which "
                                "would make every image black. The file is damaged: download it again.")
