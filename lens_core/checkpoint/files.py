"""What the model-file readers share: opening a file that must exist, reading a tensor's bytes with plain file reads,
reading a JSON object, and cutting names from a file to a length fit for a message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import LensFileError

MAX_JSON_BYTES = 64 << 20  # config.json and index.json files are kilobytes; a tokenizer.json ~30 MB
_SHOWN_CHARACTERS = 200


def short(value) -> str:
    """A name or value read from a file, fit for a message: text quoted, anything else as written, cut to a few hundred
    characters however long it is in the file."""
    text = value if isinstance(value, str) else str(value)
    text = text if len(text) <= _SHOWN_CHARACTERS else text[:_SHOWN_CHARACTERS] + "..."
    return repr(text) if isinstance(value, str) else text


def existing_file(path: str | os.PathLike) -> tuple[Path, int]:
    """(the path, its size in bytes), or a LensFileError when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise LensFileError(f"{path}: no such file.")
    return path, path.stat().st_size


def read_bytes(path: Path, offset: int, nbytes: int, name: str) -> torch.Tensor:
    """`nbytes` of the file from `offset` as a uint8 CPU tensor, read straight into it (no memory map: pages a map
    touches stay resident until it closes, doubling a large model's footprint while it loads)."""
    raw = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(raw.numpy()))
    if got != nbytes:
        raise LensFileError(f"{path}: could not read tensor {short(name)} (file truncated?). Download the file again.")
    return raw


def json_object(raw: bytes, where: str, what: str) -> dict:
    """`raw` bytes that must be a JSON object (a config, an index, a quantisation marker), or a LensFileError naming
    where they come from and what they should be: not UTF-8, not JSON, nested too deeply, or not an object."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise LensFileError(f"{where}: this is not a JSON object, so it is not the model's {what}. Download the model's "
                            "files again.")
    return value


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (config.json, an index), or a LensFileError naming the file and what it
    should be (see `json_object`; also: not a file, or too large for one)."""
    if not path.is_file():
        raise LensFileError(f"{path}: this is not a file, so it is not the model's {what}. Download the model's files again.")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise LensFileError(f"{path}: {path.stat().st_size:,} bytes is too large for the model's {what}. Download the "
                            "model's files again.")
    return json_object(path.read_bytes(), str(path), what)
