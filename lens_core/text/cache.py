"""A bounded on-disk cache of prompt features, so a repeated prompt never reloads or reruns GPT-OSS.

Keyed by the encoder's identity (file paths, sizes, mtimes), the template date and the selected
layers and the prompt. Entries are written to a temporary file and renamed into place (atomic on
POSIX and Windows), so concurrent readers never see half a file and concurrent writers of the same
key simply replace each other with identical content. The oldest entries (by last use) are removed
when the folder grows past `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .prompt import template_date


def default_cache_dir() -> Path:
    base = os.environ.get("LENS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lens")
    return Path(base) / "prompt_features"


class PromptCache:
    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = 2 << 30):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def _path(self, encoder_identity: str, prompt: str, date, layers) -> Path:
        key = json.dumps([encoder_identity, template_date(date), list(layers), prompt], ensure_ascii=False)
        return self.folder / (hashlib.sha256(key.encode("utf-8")).hexdigest() + ".safetensors")

    def get(self, encoder_identity: str, prompt: str, date, layers):
        path = self._path(encoder_identity, prompt, date, layers)
        try:
            tensors = load_file(str(path))
            os.utime(path)
        except (FileNotFoundError, OSError, ValueError, RuntimeError):
            return None
        return tensors["features"], tensors["mask"].bool(), int(tensors["dropped"].item())

    def put(self, encoder_identity: str, prompt: str, date, layers, value) -> None:
        features, mask, dropped = value
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(encoder_identity, prompt, date, layers)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"features": features.contiguous(), "mask": mask.to(torch.uint8).contiguous(),
                       "dropped": torch.tensor([dropped])}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._evict()

    def _evict(self) -> None:
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
