"""Tensor sources: what the loaders read weights from, whatever the file format.

A source (a safetensors file, a GGUF file, or a `ShardSet` of either) offers:
- `name`, `metadata` (text), `keys()`, `key in source`;
- `shape(key)`: the values' shape; `stored_shape(key)`: the shape of what `raw` gives;
- `packed_format(key)`: the formats.py format a tensor is stored in when the file itself packs it (GGUF's quantised
  types), else None;
- `raw(key)`: the tensor as stored (a packed one as its bytes, checked cheaply for NaN by its format);
- `read(key, dtype=None)`: the values (decoded when packed) in `dtype`, checked for NaN / infinity; as stored (`raw`)
  when dtype is None.

Loaders see only this interface; `open_component` finds the files of a model on disk: one file, or a folder of
shards (checked against its index, which may name only files inside that folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import LensFileError, some
from .files import read_json_object, short
from .gguf_reader import GGUFFile, open_gguf
from .identify import describe
from .safetensors_reader import SafetensorsFile

_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors")


class ShardSet:
    """Files seen as one mapping from key to tensor (a single file or the shards of one model)."""

    def __init__(self, files: list, name: str):
        self.name = name
        self.files = files
        self._where: dict[str, SafetensorsFile | GGUFFile] = {}
        for file in files:
            for key in file.keys():
                if key in self._where:
                    raise LensFileError(f"{name}: tensor {short(key)} is in both {self._where[key].path.name} and "
                                        f"{file.path.name}. The folder mixes files of two downloads: keep one model's "
                                        "shards only.")
                self._where[key] = file

    @property
    def metadata(self) -> dict:
        merged = {}
        for file in self.files:
            merged.update(file.metadata)
        return merged

    def keys(self):
        return self._where.keys()

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

    def _file_of(self, key: str):
        if key not in self._where:
            self.require([key])
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of(key).shape(key)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return self._file_of(key).stored_shape(key)

    def packed_format(self, key: str):
        return self._file_of(key).packed_format(key)

    def raw(self, key: str) -> torch.Tensor:
        return self._file_of(key).raw(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._file_of(key).read(key, dtype)


def whole_model(path: str | os.PathLike) -> Path:
    """The folder of a sharded model when `path` is one of its shards (`model-00001-of-00003.safetensors`): ComfyUI's
    model dropdowns list files, so that is what a user of Microsoft's folders picks. A complete single file named
    like a shard (`-00001-of-00001`) is that file. Any other path as it is."""
    path = Path(path)
    match = _SHARD_NAME.fullmatch(path.name)
    if path.is_file() and match and match["count"] != "00001":
        return path.parent
    return path


def open_component(path: str | os.PathLike, subfolder: str, shard_prefix: str) -> ShardSet:
    """One model of a repository: a single file, a folder of its shards (or one of the shards), or the repository
    folder that holds it in `subfolder/` (e.g. Microsoft's `Lens/transformer/`)."""
    path = whole_model(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / subfolder).is_dir():
        path = path / subfolder
    return open_checkpoint(path, shard_prefix)


def model_files(path: str | os.PathLike, subfolder: str, shard_prefix: str) -> list[Path]:
    """Every file a model at `path` is read from: its weights, and for a folder the config.json beside them."""
    ckpt = open_component(path, subfolder, shard_prefix)
    files = [Path(f.path) for f in ckpt.files]
    config = Path(ckpt.name) / "config.json"
    return files + ([config] if Path(ckpt.name).is_dir() and config.is_file() else [])


def _open_file(path: Path) -> SafetensorsFile | GGUFFile:
    return open_gguf(path) if path.suffix.lower() == ".gguf" else SafetensorsFile(path)


def _indexed_shards(index: Path) -> set[str]:
    """The shard names an index lists: plain file names inside its own folder, nothing else."""
    weight_map = read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise LensFileError(f"{index}: the shard index has no 'weight_map' of tensor names to file names. Download the "
                            "model's index.json again.")
    names = set(weight_map.values())
    for name in names:
        if not name or Path(name).name != name or name in (".", ".."):
            raise LensFileError(f"{index}: the shard index names {short(name)}, which is not a file in this folder. An "
                                "index may only name the shards beside it: download the model's index.json again.")
    return names


def _one_shard_set(folder: Path, shards: list[Path]) -> None:
    """Shards named `-0000k-of-0000n` must all belong to one set (the same stem and count)."""
    sets = {(m["stem"], m["count"]): shard.name for shard in shards if (m := _SHARD_NAME.fullmatch(shard.name))}
    if len(sets) > 1:
        first, second = sorted(sets.values())[:2]
        raise LensFileError(f"{folder}: this folder holds shards of more than one set ({first} and {second}). Keep one "
                            "model's shards in a folder.")


def open_checkpoint(path: str | os.PathLike, shard_prefix: str = "") -> ShardSet:
    """Open a single `.safetensors` / `.gguf` file or a folder of shards (checked against its index if present).

    `shard_prefix` narrows which files in a folder are weights (e.g. `diffusion_pytorch_model`).
    """
    path = Path(path)
    if path.is_file():
        return ShardSet([_open_file(path)], str(path))
    if not path.is_dir():
        raise LensFileError(f"{path}: no such file or folder.")
    shards = sorted(p for p in path.glob("*.safetensors") if p.name.startswith(shard_prefix) and p.is_file())
    indexes = sorted(p for p in path.glob("*.safetensors.index.json") if p.name.startswith(shard_prefix))
    expected: set[str] = set()
    for index in indexes:
        expected |= _indexed_shards(index)
    missing = sorted(name for name in expected if not (path / name).is_file())
    if missing:
        raise LensFileError(f"{path}: the shard index lists {len(expected)} files but {some(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} missing. Download every shard into this folder.")
    if expected:
        shards = [path / name for name in sorted(expected)]
    if not shards:
        raise LensFileError(f"{path}: this folder holds no {shard_prefix}*.safetensors files.")
    _one_shard_set(path, shards)
    return ShardSet([SafetensorsFile(p) for p in shards], str(path))
