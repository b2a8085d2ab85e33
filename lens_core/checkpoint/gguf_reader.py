"""GGUF files (llama.cpp's format, also used by stable-diffusion.cpp and ComfyUI-GGUF): tensors by name, read on
demand, behind the same interface as a safetensors file so that the loaders take either.

Layout (little-endian): "GGUF", version (2 or 3), tensor count, metadata count; the metadata as key, type, value
(numbers, text, arrays of either); per tensor its name, dimensions (innermost first), ggml type and offset; then,
from the next multiple of `general.alignment` (32), the tensor data.

Our own parser, not gguf's `GGUFReader`: that one builds numpy objects for every element of every array, which
takes over 20 s for GPT-OSS's vocabulary (201,088 tokens and 446,189 merges); here arrays are skipped and only
their positions kept (a token is read when asked for). Every count and size read from the file is checked
against the bytes the file has before anything is allocated, so a damaged or truncated file gets a message, not
a huge allocation. A quantised tensor is read as its raw bytes [..., row bytes] (uint8) when asked for without a
dtype, so that a GGUF layer keeps it quantised; asked for with a dtype, it is dequantised (gguf_quants.py).
Shapes are given in torch's order.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LensFileError, all_finite
from .files import content_fingerprint, existing_file, read_bytes
from .gguf_quants import FLOAT_TYPES, TYPES, dequantize, row_bytes, type_name

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_READ_AHEAD = 16 << 20  # the header is read in pieces of this size (GPT-OSS's vocabulary makes it ~15 MB)


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential reads from the start of a file, checked against its size."""

    def __init__(self, file, size: int):
        self.file, self.size = file, size
        self.buffer, self.start, self.pos = b"", 0, 0  # `buffer` holds the file from `start`

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated()
        if self.pos + n > self.start + len(self.buffer):
            self.file.seek(self.pos)
            self.buffer, self.start = self.file.read(max(n, _READ_AHEAD)), self.pos

    def take(self, n: int) -> bytes:
        self._need(n)
        offset = self.pos - self.start
        self.pos += n
        return self.buffer[offset:offset + n]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> np.ndarray:
        """Skip `count` strings; returns where each starts (its length field) in the file. (The loop reads the
        buffer directly: GPT-OSS's vocabulary is 650,000 strings.)"""
        if count > (self.size - self.pos) // 8:
            raise _Truncated()
        starts = np.empty(count, dtype=np.int64)
        pos, length_at = self.pos, struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > self.start + len(self.buffer):
                self.pos = pos
                self._need(8)
            starts[i] = pos
            pos += 8 + length_at(self.buffer, pos - self.start)[0]
            if pos > self.size:
                raise _Truncated()
        self.pos = pos
        return starts


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]  # the values' shape, torch order
    qtype: int  # ggml type id
    offset: int  # of its data, from the file's start
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_TYPES.get(self.qtype, torch.uint8)


@dataclass(frozen=True)
class _Array:
    kind: int  # element type
    count: int
    start: int  # of the first element, in the file
    string_starts: np.ndarray | None  # for arrays of text


class GGUFFile:
    """One `.gguf` file: its header is parsed and every tensor's type checked on open; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.size = existing_file(path)
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LensFileError(f"{self.path}: this is not a GGUF file (it does not start with 'GGUF'). Is it a "
                                    ".safetensors file renamed, or a partial download? Download it again.")
            try:
                self._parse(_Cursor(f, self.size))
            except (_Truncated, struct.error):
                raise LensFileError(f"{self.path}: the GGUF file is truncated or damaged (its header or a tensor runs "
                                    "past the end of the file). Download it again.") from None

    def _parse(self, cursor: _Cursor) -> None:
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise LensFileError(f"{self.path}: GGUF version {version}; this pack reads versions 2 and 3 (llama.cpp's "
                                "current files). Convert the model again with a current tool.")
        tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        if max(tensor_count, kv_count) > self.size // 8:
            raise _Truncated()
        self._values: dict[str, object] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self._values[key] = self._value(cursor, cursor.scalar("<I"))
        self.metadata = {k: v for k, v in self._values.items() if isinstance(v, str)}
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise LensFileError(f"{self.path}: tensor {name[:80]} has {n_dims} dimensions; GGUF allows up to 4. The "
                                    "file is damaged: download it again.")
            dims = [cursor.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")))
        alignment = self._values.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise _Truncated()
        data_start = -(-cursor.pos // alignment) * alignment
        self._header_bytes = data_start
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, qtype, offset in infos:
            if qtype not in TYPES:
                raise LensFileError(
                    f"{self.path}: tensor {name} is stored as {_ggml_type_name(qtype)}, a type this pack does not "
                    f"decode (it reads {', '.join(n for n, _, _ in TYPES.values())}). Pick a file quantised to one of those.")
            values = int(np.prod(shape, dtype=np.float64)) if shape else 1
            _, block, size = TYPES[qtype]
            if shape and shape[-1] % block:
                raise LensFileError(f"{self.path}: tensor {name} ({type_name(qtype)}) has rows of {shape[-1]} values, not "
                                    f"whole blocks of {block}. The file is damaged: download it again.")
            nbytes = values // block * size
            if data_start + offset + nbytes > self.size:
                raise _Truncated()
            self.tensors[name] = GGUFTensor(shape, qtype, data_start + offset, nbytes)

    def _value(self, cursor: _Cursor, kind: int):
        if kind in _SCALARS:
            return cursor.scalar(_SCALARS[kind])
        if kind == _STRING:
            return cursor.string()
        if kind != _ARRAY:
            raise _Truncated()
        element, count = cursor.scalar("<I"), cursor.scalar("<Q")
        start = cursor.pos
        if element == _STRING:
            return _Array(element, count, start, cursor.skip_strings(count))
        if element not in _SCALARS:
            raise _Truncated()  # arrays of arrays: no model file this pack reads has them
        cursor.take(count * struct.calcsize(_SCALARS[element]))
        return _Array(element, count, start, None)

    def value(self, key: str, default=None):
        """A metadata value (a number or text; `default` where absent or an array)."""
        value = self._values.get(key, default)
        return default if isinstance(value, _Array) else value

    def array_item(self, key: str, index: int):
        """Item `index` of a metadata array (e.g. a token of `tokenizer.ggml.tokens`); None where there is none."""
        array = self._values.get(key)
        if not isinstance(array, _Array) or not 0 <= index < array.count:
            return None
        with open(self.path, "rb") as f:
            if array.string_starts is not None:
                f.seek(int(array.string_starts[index]))
                (length,) = struct.unpack("<Q", f.read(8))
                return f.read(min(length, self.size)).decode("utf-8", errors="replace")
            fmt = _SCALARS[array.kind]
            f.seek(array.start + index * struct.calcsize(fmt))
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    @property
    def quant_types(self) -> dict[str, int]:
        """Tensor name -> ggml type, for the tensors stored quantised."""
        return {name: t.qtype for name, t in self.tensors.items() if t.qtype not in FLOAT_TYPES}

    def keys(self):
        return self.tensors.keys()

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape `read(name)` gives: the values' shape, or for a quantised tensor its rows of raw bytes."""
        info = self.tensors[name]
        return info.shape if info.qtype in FLOAT_TYPES else (*info.shape[:-1], row_bytes(info.qtype, info.shape[-1]))

    def fingerprint(self) -> str:
        return content_fingerprint(self.path, self.size, self._header_bytes)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` on the CPU: as stored when `dtype` is None (raw bytes for a quantised one), else its
        values in `dtype`. Values are checked for NaN / infinity here, where the file can still be named."""
        info = self.tensors[name]
        raw = read_bytes(self.path, info.offset, info.nbytes, name)
        if info.qtype in FLOAT_TYPES:
            stored = values = raw.view(FLOAT_TYPES[info.qtype]).reshape(info.shape)
        else:
            stored = raw.reshape(self.stored_shape(name))
            values = dequantize(stored, info.qtype, info.shape)
        if not all_finite(values):
            raise LensFileError(f"{self.path}: tensor {name} ({type_name(info.qtype)}) holds NaN or infinite values, "
                                "which would make every image black. The file is damaged: download it again.")
        return stored if dtype is None else values.to(dtype)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed file, shared while it is unchanged (same size and modification time): the loader node opens an
    encoder's GGUF for the weights, the tokenizer check and the content fingerprint, and ComfyUI asks for that
    fingerprint before every run."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return GGUFFile(path)  # reports the missing file
    return _parsed(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


_GGML_TYPE_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S",
                    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}


def _ggml_type_name(qtype: int) -> str:
    return _GGML_TYPE_NAMES.get(qtype, f"ggml type {qtype}")
