"""One definition of "the same model", for every cache: the loader node's model cache, the prompt-feature cache,
ComfyUI's IS_CHANGED fingerprint and the GGUF header cache.

A file's identity is the SHA-256 of its whole content; a model's is the hash of the identities and names of every
file that changes its results (weights, config.json, tokenizer files). Callers add the settings that change results
(the compute dtype). So two different files never share an identity, and any change of content changes it.

Hashing is paid once per version of a file: the hash is remembered under the file's version key (device, inode,
size, modification time and status-change time). Writing to a file or putting another file in its place changes
that key: the system sets the status-change time on every write and rename, and no tool (`touch`, `cp -p`, `rsync
-a`) can set it back, while a replacement has a new inode. A file that may have changed is therefore hashed again;
only an unchanged file gets its remembered hash. The memo lives in memory and in a small JSON file in the cache
folder (a restart does not hash 13 GB again); when that file is damaged or cannot be written, files are hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from ..errors import LensFileError

log = logging.getLogger("lens_core")
_CHUNK = 16 << 20
_MEMO_ENTRIES = 512
_lock = threading.Lock()
_memo: dict[str, str] | None = None


def cache_root() -> Path:
    """$LENS_CACHE_DIR, else ~/.cache/lens (XDG_CACHE_HOME respected)."""
    base = os.environ.get("LENS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lens")
    return Path(base)


def version_key(path: Path) -> str:
    """The key under which a version of a file is remembered (see the module docstring)."""
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def _memo_file() -> Path:
    return cache_root() / "file_hashes.json"


def _load_memo() -> dict[str, str]:
    global _memo
    if _memo is None:
        try:
            loaded = json.loads(_memo_file().read_text(encoding="utf-8"))
            _memo = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(loaded, dict) else {}
        except (OSError, ValueError, RecursionError):
            _memo = {}
    return _memo


def _save_memo(memo: dict[str, str]) -> None:
    folder = _memo_file().parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(list(memo.items())[-_MEMO_ENTRIES:]), f)
        os.replace(tmp, _memo_file())
    except OSError as e:
        log.warning("Lens: could not remember file hashes in %s (%s); large files are hashed again next time.", folder,
                    e.strerror or e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, remembered per version of the file."""
    path = Path(path)
    try:
        key = version_key(path)
    except OSError as e:
        raise LensFileError(f"{path}: cannot be read ({e.strerror or e}).") from None
    with _lock:
        memo = _load_memo()
        if key in memo:
            return memo[key]
    try:
        digest = _sha256(path)
    except OSError as e:
        raise LensFileError(f"{path}: cannot be read ({e.strerror or e}).") from None
    with _lock:
        memo.pop(key, None)
        memo[key] = digest
        _save_memo(memo)
    return digest


def model_identity(files: list[Path], root: Path | None = None) -> str:
    """The identity of a model made of `files` (names relative to `root` where given, so a moved folder keeps it)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(f"{name}\0{file_identity(path)}\n".encode())
    return digest.hexdigest()


def forget_remembered_hashes() -> None:
    """Drop the in-memory memo (tests: as after a restart)."""
    global _memo
    with _lock:
        _memo = None
