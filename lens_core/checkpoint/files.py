"""What the model-file readers share: opening a file that must exist, reading a tensor's bytes with plain file
reads, and a content fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import LensFileError

_FINGERPRINT_SAMPLES, _FINGERPRINT_SAMPLE_BYTES = 16, 64 * 1024
_FINGERPRINT_WHOLE_BYTES = 64 * 1024 * 1024  # files up to this size are hashed whole


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
        raise LensFileError(f"{path}: could not read tensor {name!r} (file truncated?). Download the file again.")
    return raw


def content_fingerprint(path: Path, size: int, header_bytes: int) -> str:
    """A hash of a model file's content: its header, its size and 16 samples of 64 KiB spread over its data (1 MiB
    read, whatever the file's size; files up to 64 MiB are hashed whole). Unlike size and modification time, it
    tells a fine-tune (every weight changed) from its base and survives copies that keep mtimes (`cp -p`,
    `rsync -a`, tar); an edit of a few bytes between samples of a large file goes unseen."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(header_bytes))
        if size <= _FINGERPRINT_WHOLE_BYTES:
            digest.update(f.read())
            return digest.hexdigest()
        span = max(size - header_bytes - _FINGERPRINT_SAMPLE_BYTES, 0)
        for i in range(_FINGERPRINT_SAMPLES):
            f.seek(header_bytes + span * i // (_FINGERPRINT_SAMPLES - 1))
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()
