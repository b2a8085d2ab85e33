"""What "the same model" costs (lens_core/checkpoint/identity.py): the SHA-256 of a file of real model size the first
time, then a remembered hash in the same process and after a restart (a new process reading the memo file).

    python bench/bench_identity.py --size-gb 13    # one JSON line; writes and deletes a 13 GB file in --folder

The file is written from one random 64 MiB block repeated, so writing it is fast; the hash reads every byte either
way. `read_seconds` is the time to read the file once (the page-cache baseline the first hash is compared with).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lens_core.checkpoint.identity import file_identity  # noqa: E402

_BLOCK = 64 << 20


def write_file(path: Path, size: int) -> None:
    block = os.urandom(_BLOCK)
    with open(path, "wb") as f:
        for written in range(0, size, _BLOCK):
            f.write(block[:min(_BLOCK, size - written)])


def read_once(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return time.perf_counter() - started


def timed_identity(path: Path) -> float:
    started = time.perf_counter()
    file_identity(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=13.0)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": timed_identity(Path(args.child))}))
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        os.environ["LENS_CACHE_DIR"] = str(Path(folder) / "cache")
        path = Path(folder) / "model.safetensors"
        write_file(path, int(args.size_gb * 1e9))
        read_seconds = read_once(path)
        first = timed_identity(path)
        again = timed_identity(path)
        child = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=True,
                               env=os.environ)
        restart = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
    print(json.dumps({"size_gb": args.size_gb, "read_seconds": round(read_seconds, 2), "first_hash_seconds": round(first, 2),
                      "first_vs_read": round(first / read_seconds, 2), "remembered_seconds": round(again, 6),
                      "after_restart_seconds": round(restart, 6)}))


if __name__ == "__main__":
    main()
