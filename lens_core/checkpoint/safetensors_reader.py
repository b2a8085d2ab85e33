"""Reading safetensors files one tensor at a time, without memory-mapping them.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page it touches stays
in the process's resident set until the file is closed. Loading an 8 GB checkpoint that way
shows ~2x the model's size in RSS. Here each tensor is read with `readinto` straight into its
own buffer, so the resident memory while loading is the loaded model plus one tensor.
The format is small and fixed (8-byte little-endian header length, a JSON header, raw data),
and the files are still *written* with the `safetensors` library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LensFileError, all_finite, some
from .files import content_fingerprint, existing_file, read_bytes
from .gguf_reader import GGUFFile, open_gguf
from .identify import describe

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


def _short(name: str) -> str:
    """A tensor name fit for a message, however long the name in the file is."""
    return repr(some([name]))


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {_short(duplicate)} appears more than once")
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
    broken = f"{where}: tensor {_short(name)} has a broken header entry"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LensFileError(f"{broken} (expected dtype, shape and data_offsets). Download the file again.")
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise LensFileError(f"{where}: tensor {_short(name)} has dtype {str(info['dtype'])[:20]!r}, which this pack "
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
                f"{where}: the file is truncated ({data_bytes:,} bytes of tensor data, tensor {_short(name)} needs "
                f"{info.end:,}). The download was probably interrupted: download it again."
            )
        if info.start < previous_end:
            raise LensFileError(f"{where}: tensors {_short(previous)} and {_short(name)} overlap in the file. "
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

    def fingerprint(self) -> str:
        return content_fingerprint(self.path, self.size, self._data_start)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` on the CPU, converted to `dtype` if given (one buffer at a time). Floating tensors are
        checked for NaN / infinity here, once, where the file can still be named (8-bit ones hold packed data)."""
        info = self.tensors[name]
        raw = read_bytes(self.path, self._data_start + info.start, info.end - info.start, name)
        tensor = raw.view(info.dtype).reshape(info.shape)
        if info.dtype.itemsize > 1 and not all_finite(tensor):
            raise LensFileError(f"{self.path}: tensor {_short(name)} holds NaN or infinite values, which would make every "
                                "image black. The file is damaged: download it again.")
        if dtype is not None and dtype != tensor.dtype:
            tensor = tensor.to(dtype)
        return tensor


class Checkpoint:
    """A set of safetensors files seen as one mapping from key to tensor (a single file or shards)."""

    def __init__(self, files: list[SafetensorsFile | GGUFFile], name: str):
        self.name = name
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for file in files:
            for key in file.keys():
                self._where[key] = file

    @property
    def metadata(self) -> dict:
        merged = {}
        for file in self.files:
            merged.update(file.metadata)
        return merged

    def keys(self):
        return self._where.keys()

    def fingerprint(self) -> str:
        """A hash of the content of every file (see `SafetensorsFile.fingerprint`)."""
        return hashlib.sha256(" ".join(f.fingerprint() for f in self.files).encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def require(self, keys) -> None:
        """Raise a LensFileError naming the file, what it looks like and the missing keys (a few, then a count)."""
        missing = [key for key in keys if key not in self._where]
        if missing:
            raise LensFileError(
                f"{self.name}: this looks like {describe(self.keys(), self.shape)}, but {len(missing)} of its weights "
                f"{'is' if len(missing) == 1 else 'are'} missing ({some(missing)}). The file is incomplete (an "
                "interrupted download or a missing shard?): download it again."
            )

    def _file_of(self, key: str) -> SafetensorsFile:
        if key not in self._where:
            self.require([key])
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of(key).tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._file_of(key).tensors[key].dtype

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """The shape `read(key)` gives: the values' shape, except a GGUF-quantised tensor's rows of raw bytes."""
        file = self._file_of(key)
        return file.stored_shape(key) if isinstance(file, GGUFFile) else file.tensors[key].shape

    def gguf_type(self, key: str) -> int | None:
        """The ggml type of a tensor stored GGUF-quantised; None for any other."""
        file = self._file_of(key)
        return file.quant_types.get(key) if isinstance(file, GGUFFile) else None

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._file_of(key).read(key, dtype)


_SHARD_NAME = re.compile(r".+-\d{5}-of-\d{5}\.safetensors")


def whole_model(path: str | os.PathLike) -> Path:
    """The folder of a sharded model when `path` is one of its shards (`model-00001-of-00003.safetensors`): ComfyUI's
    model dropdowns list files, so that is what a user of Microsoft's folders picks. Any other path as it is."""
    path = Path(path)
    return path.parent if path.is_file() and _SHARD_NAME.fullmatch(path.name) else path


def open_component(path: str | os.PathLike, subfolder: str, shard_prefix: str) -> Checkpoint:
    """One model of a repository: a single file, a folder of its shards (or one of the shards), or the repository
    folder that holds it in `subfolder/` (e.g. Microsoft's `Lens/transformer/`)."""
    path = whole_model(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / subfolder).is_dir():
        path = path / subfolder
    return open_checkpoint(path, shard_prefix)


def _open_file(path: Path) -> SafetensorsFile | GGUFFile:
    return open_gguf(path) if path.suffix.lower() == ".gguf" else SafetensorsFile(path)


def open_checkpoint(path: str | os.PathLike, shard_prefix: str = "") -> Checkpoint:
    """Open a single `.safetensors` file or a folder of shards (checked against its index if present).

    `shard_prefix` narrows which files in a folder are weights (e.g. `diffusion_pytorch_model`).
    """
    path = Path(path)
    if path.is_file():
        return Checkpoint([_open_file(path)], str(path))
    if not path.is_dir():
        raise LensFileError(f"{path}: no such file or folder.")
    shards = sorted(p for p in path.glob("*.safetensors") if p.name.startswith(shard_prefix))
    indexes = sorted(p for p in path.glob("*.safetensors.index.json") if p.name.startswith(shard_prefix))
    expected: set[str] = set()
    for index in indexes:
        try:
            expected |= set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as e:
            raise LensFileError(f"{index}: the shard index is not valid JSON with a 'weight_map' ({e}).") from None
    missing = sorted(name for name in expected if not (path / name).is_file())
    if missing:
        raise LensFileError(
            f"{path}: the shard index lists {len(expected)} files but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Download every shard into this folder."
        )
    if expected:
        shards = [path / name for name in sorted(expected)]
    if not shards:
        raise LensFileError(f"{path}: this folder holds no {shard_prefix}*.safetensors files.")
    return Checkpoint([SafetensorsFile(p) for p in shards], str(path))


def fingerprint(path: str | os.PathLike) -> str:
    """A content hash of a model file, or of a model folder (its safetensors files and JSON configs, at any depth),
    for caches that must not confuse two models (see `SafetensorsFile.fingerprint`). A shard stands for its folder."""
    path = whole_model(path)
    if path.is_file():
        return _open_file(path).fingerprint()
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.json")):
        part = SafetensorsFile(file).fingerprint() if file.suffix == ".safetensors" else file.read_bytes()
        digest.update(f"{file.relative_to(path)}\n".encode() + (part.encode() if isinstance(part, str) else part))
    return digest.hexdigest()
