"""A bounded on-disk cache of prompt features, so a repeated prompt never reloads or reruns GPT-OSS.

Keyed by the encoder's identity (the SHA-256 of every file it was loaded from, checkpoint/identity.py: a fine-tune
with the same size and mtime is another encoder), the feature code's version, the compute dtype, the template date,
the selected layers and the prompt. Entries are written to a temporary file and renamed into place (atomic on POSIX
and Windows), so concurrent readers never see half a file and concurrent writers of the same key simply replace each
other with identical content. The oldest entries (by last use) are removed when the folder grows past `max_bytes`,
and temporary files left by a killed write are removed after an hour.

The cache is an optimisation and never fails an encode: an entry that cannot be read, has the wrong shapes or holds
non-finite values is discarded with a warning and recomputed; a cache that cannot be written warns and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.safetensors_reader import SafetensorsFile
from ..errors import LensFileError
from .prompt import template_date

log = logging.getLogger("lens_core")
_STALE_TEMPORARY_SECONDS = 3600


def default_cache_dir() -> Path:
    base = os.environ.get("LENS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lens")
    return Path(base) / "prompt_features"


class PromptCache:
    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = 2 << 30):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def _path(self, encoder_identity: str, prompt: str, date, layers) -> Path:
        key = json.dumps([encoder_identity, template_date(date), list(layers), prompt])  # ASCII: lone surrogates too
        return self.folder / (hashlib.sha256(key.encode("ascii")).hexdigest() + ".safetensors")

    def get(self, encoder_identity: str, prompt: str, date, layers, hidden: int):
        """(features [n, len(layers), hidden] float32, mask [n] bool, dropped tokens), or None when not cached."""
        path = self._path(encoder_identity, prompt, date, layers)
        if not path.is_file():
            return None
        try:  # read into memory, not memory-mapped: a file damaged while mapped would crash the process
            entry = SafetensorsFile(path)
            features, mask, dropped = (entry.read(name) if name in entry.tensors else None
                                       for name in ("features", "mask", "dropped"))
        except (LensFileError, OSError) as e:
            return self._discard(path, f"it cannot be read ({str(e)[:160]})")
        if (features is None or mask is None or dropped is None or features.dtype != torch.float32 or features.ndim != 3
                or features.shape[1:] != (len(layers), hidden) or mask.shape != features.shape[:1] or dropped.numel() != 1):
            return self._discard(path, "it does not hold features of this encoder's shape")
        try:
            os.utime(path)
        except OSError:
            pass
        return features, mask.bool(), int(dropped.item())

    def _discard(self, path: Path, why: str) -> None:
        log.warning("Lens: the cached prompt features %s are discarded and computed again: %s.", path, why)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def put(self, encoder_identity: str, prompt: str, date, layers, value) -> None:
        """Store an entry; a cache that cannot be written (read-only, full disk, not a folder) only warns."""
        features, mask, dropped = value
        path = self._path(encoder_identity, prompt, date, layers)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            os.close(fd)
            save_file({"features": features.contiguous(), "mask": mask.to(torch.uint8).contiguous(),
                       "dropped": torch.tensor([dropped])}, tmp)
            os.replace(tmp, path)
            self._evict()
        except Exception as e:  # OSError, or safetensors' own error type for a failed write
            log.warning("Lens: could not write the prompt cache in %s (%s); prompts are encoded again next time. "
                        "Set LENS_CACHE_DIR to a writable folder to keep them.", self.folder, str(e)[:200])
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _evict(self) -> None:
        for p in self.folder.glob("*.tmp"):  # left by a write that was killed
            try:
                if time.time() - p.stat().st_mtime > _STALE_TEMPORARY_SECONDS:
                    p.unlink()
            except OSError:
                pass
        entries = []
        for p in self.folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            total -= size
