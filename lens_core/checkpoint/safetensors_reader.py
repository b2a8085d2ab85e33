"""Reading safetensors files one tensor at a time, without memory-mapping them.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page it touches stays
in the process's resident set until the file is closed. Loading an 8 GB checkpoint that way
shows ~2x the model's size in RSS. Here each tensor is read with `readinto` straight into its
own buffer, so the resident memory while loading is the loaded model plus one tensor.
The format is small and fixed (8-byte little-endian header length, a JSON header, raw data),
and the files are still *written* with the `safetensors` library.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import LensFileError, all_finite
from .files import existing_file, read_bytes, short

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {short(duplicate)} appears more than once")
    return dict(pairs)


def _load_header_json(raw: bytes, where: str) -> dict:
    """The header as a dict of tensor entries; any other JSON (a list, a number, nesting too deep for Python's
    parser, duplicate keys) is a broken file."""
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise LensFileError(f"{where}: the safetensors header is corrupt ({str(e)[:200]}). Download the file again.") from None
    except RecursionError:
        raise LensFileError(f"{where}: the safetensors header is corrupt (nested too deeply). Download the file again.") from None
    if not isinstance(header, dict):
        raise LensFileError(f"{where}: the safetensors header is a JSON {type(header).__name__}, not a map of tensors. "
                            "Download the file again.")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(name: str, info, where: str) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of counts, offsets that hold exactly that many bytes."""
    broken = f"{where}: tensor {short(name)} has a broken header entry"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LensFileError(f"{broken} (expected dtype, shape and data_offsets). Download the file again.")
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise LensFileError(f"{where}: tensor {short(name)} has dtype {str(info['dtype'])[:20]!r}, which this pack "
                            "cannot read.")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise LensFileError(f"{broken} (its shape is not a list of non-negative whole numbers). Download the file again.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets) \
            or offsets[0] > offsets[1]:
        raise LensFileError(f"{broken} (its data_offsets are not [start, end] with 0 <= start <= end). "
                            "Download the file again.")
    start, end = offsets
    elements = 1
    for n in shape:
        elements *= n
    if elements * dtype.itemsize != end - start:
        raise LensFileError(f"{broken} (shape {shape[:8]} of {info['dtype']} needs {elements * dtype.itemsize:,} bytes, "
                            f"its offsets hold {end - start:,}). Download the file again.")
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_layout(tensors: dict[str, TensorInfo], data_bytes: int, where: str) -> None:
    """Every tensor inside the file, and no two sharing bytes."""
    previous_end, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_bytes:
            raise LensFileError(
                f"{where}: the file is truncated ({data_bytes:,} bytes of tensor data, tensor {short(name)} needs "
                f"{info.end:,}). The download was probably interrupted: download it again."
            )
        if info.start < previous_end:
            raise LensFileError(f"{where}: tensors {short(previous)} and {short(name)} overlap in the file. "
                                "Download the file again.")
        if info.end > info.start:
            previous_end, previous = info.end, name


class SafetensorsFile:
    """One `.safetensors` file: its header is parsed and checked on open; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.size = existing_file(path)
        self.metadata, self.tensors, self._data_start = self._parse_header()

    def _parse_header(self):
        where = f"{self.path}"
        redownload = "Download the file again."
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LensFileError(f"{where}: the file is empty or truncated; it is not a safetensors file. {redownload}")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, self.size - 8):
                raise LensFileError(
                    f"{where}: this is not a valid safetensors file (bad header length). "
                    "It may be a .ckpt/.pt/.gguf file renamed, or a partial download: download it again."
                )
            header = _load_header_json(f.read(header_len), where)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise LensFileError(f"{where}: the safetensors metadata is not a map of text to text. {redownload}")
        data_start = 8 + header_len
        tensors = {name: _tensor_info(name, info, where) for name, info in header.items()}
        _check_layout(tensors, self.size - data_start, where)
        return metadata, tensors, data_start

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def packed_format(self, name: str):
        """None: a safetensors file stores plain tensors (packed layers are assembled from several of them)."""
        return None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor `name` on the CPU as stored. Floating tensors of 16 bits and more are checked for NaN / infinity
        here, once, where the file can still be named (8-bit ones hold packed data, checked by their format)."""
        info = self.tensors[name]
        raw = read_bytes(self.path, self._data_start + info.start, info.end - info.start, name)
        tensor = raw.view(info.dtype).reshape(info.shape)
        if info.dtype.itemsize > 1 and not all_finite(tensor):
            raise LensFileError(f"{self.path}: tensor {short(name)} holds NaN or infinite values, which would make every "
                                "image black. The file is damaged: download it again.")
        return tensor

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` on the CPU, converted to `dtype` if given (one buffer at a time)."""
        tensor = self.raw(name)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)
