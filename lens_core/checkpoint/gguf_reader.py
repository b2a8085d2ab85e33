"""GGUF files (llama.cpp's format, also used by stable-diffusion.cpp and ComfyUI-GGUF): tensors by name, read on
demand, behind the tensor-source interface of source.py so that the loaders take either format.

Layout (little-endian): "GGUF", version (2 or 3), tensor count, metadata count; the metadata as key, type, value
(numbers, text, arrays of either); per tensor its name, dimensions (innermost first), ggml type and offset; then,
from the next multiple of `general.alignment` (32), the tensor data.

Our own parser, not gguf's `GGUFReader`: that one builds numpy objects for every element of every array, which
takes over 20 s for GPT-OSS's vocabulary (201,088 tokens and 446,189 merges); here arrays are skipped and only
their positions kept (a token is read when asked for). Every count, size and offset read from the file is checked
against the bytes the file has before anything is allocated or read, as llama.cpp's own reader does: tensor names
are unique, every tensor's data is aligned, inside the file and shares no byte with another. A damaged or truncated
file gets a message, not a huge allocation. Shapes are given in torch's order.
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
from ..quant import formats, gguf_blocks
from .files import existing_file, read_bytes, short
from .identity import version_key

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_MAX_STRING = 1 << 20  # keys, names and text values are far shorter; a longer one means a damaged header
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

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated()
        self.pos += n

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        if length > _MAX_STRING:
            raise _Truncated()
        return self.take(length).decode("utf-8", errors="replace")

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


@dataclass(frozen=True)
class _Array:
    kind: int  # element type
    count: int
    start: int  # of the first element, in the file
    string_starts: np.ndarray | None  # for arrays of text


class GGUFFile:
    """One `.gguf` file: its header is parsed and every tensor checked on open; tensors are read on demand."""

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
                raise LensFileError(f"{self.path}: tensor {short(name)} has {n_dims} dimensions; GGUF allows up to 4. The "
                                    "file is damaged: download it again.")
            dims = [cursor.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")))
        alignment = self._values.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 20 \
                or alignment & (alignment - 1):
            raise LensFileError(f"{self.path}: general.alignment is {short(alignment)}, not a power of two. The file is "
                                "damaged: download it again.")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, qtype, offset in infos:
            if name in self.tensors:
                raise LensFileError(f"{self.path}: tensor {short(name)} appears twice. The file is damaged: download it again.")
            if offset % alignment:
                raise LensFileError(f"{self.path}: tensor {short(name)} starts at offset {offset}, not a multiple of the "
                                    f"file's alignment {alignment}. The file is damaged: download it again.")
            self.tensors[name] = self._tensor(name, shape, qtype, data_start + offset)
        self._check_no_overlap()

    def _tensor(self, name: str, shape: tuple[int, ...], qtype: int, offset: int) -> GGUFTensor:
        if qtype not in gguf_blocks.TYPES and qtype not in gguf_blocks.FLOAT_TYPES:
            readable = [b.name for b in gguf_blocks.TYPES.values()] + [n for n, _ in gguf_blocks.FLOAT_TYPES.values()]
            raise LensFileError(
                f"{self.path}: tensor {short(name)} is stored as {gguf_blocks.type_name(qtype)}, a type this pack does not "
                f"decode (it reads {', '.join(readable)}). Pick a file quantised to one of those.")
        if 0 in shape:
            raise LensFileError(f"{self.path}: tensor {short(name)} has shape {list(shape)}, with no values; no weight of a "
                                "model is empty. The file is damaged: download it again.")
        values = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if qtype in gguf_blocks.FLOAT_TYPES:
            nbytes = values * gguf_blocks.FLOAT_TYPES[qtype][1].itemsize
        else:
            block = gguf_blocks.TYPES[qtype]
            if not shape or shape[-1] % block.values:
                raise LensFileError(f"{self.path}: tensor {short(name)} ({block.name}) has rows of "
                                    f"{shape[-1] if shape else 1} values, not whole blocks of {block.values}. The file is "
                                    "damaged: download it again.")
            nbytes = values // block.values * block.nbytes
        if offset + nbytes > self.size:
            raise _Truncated()
        return GGUFTensor(shape, qtype, offset, nbytes)

    def _check_no_overlap(self) -> None:
        previous = None
        for name, info in sorted(self.tensors.items(), key=lambda item: item[1].offset):
            if previous is not None and info.nbytes and info.offset < previous[1].offset + previous[1].nbytes:
                raise LensFileError(f"{self.path}: tensors {short(previous[0])} and {short(name)} share bytes in the file. "
                                    "The file is damaged: download it again.")
            if info.nbytes:
                previous = (name, info)

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
        cursor.skip(count * struct.calcsize(_SCALARS[element]))
        return _Array(element, count, start, None)

    def value(self, key: str, default=None):
        """A metadata value as stored (a number or text; `default` where absent or an array). Loaders check its type and
        range (text/gguf_loader.py)."""
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
                return f.read(min(length, _MAX_STRING)).decode("utf-8", errors="replace")
            fmt = _SCALARS[array.kind]
            f.seek(array.start + index * struct.calcsize(fmt))
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape `raw(name)` gives: the values' shape, or for a quantised tensor its rows of bytes."""
        info, fmt = self.tensors[name], self.packed_format(name)
        return info.shape if fmt is None else (*info.shape[:-1], fmt.row_bytes(info.shape[-1]))

    def packed_format(self, name: str):
        """The format of a tensor stored in one of ggml's block types; None for a float tensor."""
        qtype = self.tensors[name].qtype
        return None if qtype in gguf_blocks.FLOAT_TYPES else formats.gguf(qtype)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor `name` on the CPU as stored: a float tensor's values, a quantised one's bytes [..., row bytes]
        (checked for NaN from its scales, without decoding)."""
        info = self.tensors[name]
        raw = read_bytes(self.path, info.offset, info.nbytes, name)
        fmt = self.packed_format(name)
        if fmt is None:
            stored = raw.view(gguf_blocks.FLOAT_TYPES[info.qtype][1]).reshape(info.shape)
            finite = all_finite(stored)
        else:
            stored = raw.reshape(self.stored_shape(name))
            finite = fmt.finite({"weight": stored})
        if not finite:
            raise LensFileError(f"{self.path}: tensor {short(name)} ({gguf_blocks.type_name(info.qtype)}) holds NaN or "
                                "infinite values, which would make every image black. The file is damaged: download it again.")
        return stored

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values of tensor `name` on the CPU, decoded straight into `dtype`; as stored (`raw`) when dtype is None."""
        info, stored = self.tensors[name], self.raw(name)
        fmt = self.packed_format(name)
        if dtype is None or fmt is None:
            return stored if dtype is None else stored.to(dtype)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return fmt.decode({"weight": stored.reshape(rows, -1)}, rows, info.shape[-1], dtype).reshape(info.shape)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed file, shared while it is the same version of the file (identity.version_key: a file written to or
    replaced gets a new key, whatever its size and modification time): the loader node opens an encoder's GGUF for
    the weights and the tokenizer check."""
    path = Path(path).resolve()
    try:
        key = version_key(path)
    except OSError:
        return GGUFFile(path)  # reports the missing file
    return _parsed(path, key)


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, version: str) -> GGUFFile:
    return GGUFFile(path)
