"""Writing multi-GB safetensors files tensor by tensor (the `safetensors` library needs every tensor in
RAM at once, which a benchmark of loading memory cannot afford)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}


def write_streaming(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                    make: Callable[[str, torch.dtype, tuple[int, ...]], torch.Tensor], metadata: dict | None = None) -> None:
    """Write `tensors` (name -> (dtype, shape)) to `path`, asking `make` for each tensor only when it is written."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, shape) in tensors.items():
            tensor = make(name, dtype, shape)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
