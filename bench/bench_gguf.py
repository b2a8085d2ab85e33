"""GGUF benchmark: weight bytes of each quantisation level against bf16, and the forward-time cost of dequantising
each Linear per forward against the same model with the weights dequantised once (one JSON line per type).

    python bench/bench_gguf.py                                   # CUDA: real width, 4 blocks, 1024^2 tokens
    python bench/bench_gguf.py --device cpu --blocks 2 --size 256  # a CPU run

Random real-width weights (random blocks of each type: the speed does not depend on their values) written with the
gguf package, loaded with load_dit; `bytes_vs_bf16` is the quantised model's weight bytes over the bf16 model's;
on CUDA `peak_allocated_gb` is the GPU memory peak of the quantised model's forwards (weights, one dequantised
layer at a time, activations; both models are on the GPU, so it includes the dense copy's weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_files import random_dit_state, write_gguf, write_single  # noqa: E402

from lens_core import DiTConfig, load_dit  # noqa: E402
from lens_core.device import model_bytes  # noqa: E402

TYPES = {"Q8_0": 8, "Q6_K": 14, "Q5_K": 13, "Q4_K": 12, "Q4_0": 2, "IQ4_XS": 23}


def seconds_per_forward(dit, size: int, device: torch.device, repeats: int) -> float:
    tokens = (size // 16) ** 2
    cfg = dit.config
    args = (torch.randn(1, tokens, cfg.in_channels, device=device), torch.tensor([0.5], device=device),
            torch.randn(1, 128, cfg.text_layers, cfg.text_width, device=device), None, (size // 16, size // 16))
    with torch.no_grad():
        dit(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dit(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    state = random_dit_state(DiTConfig(blocks=args.blocks))
    bf16_bytes = sum(t.numel() * 2 for t in state.values())
    with tempfile.TemporaryDirectory() as folder:
        for name in args.types:
            reference = write_gguf(Path(folder) / f"{name}.gguf", state, TYPES[name], np.random.default_rng(0))
            quantised = load_dit(Path(folder) / f"{name}.gguf", device=device, dtype=dtype)
            dense = load_dit(write_single(reference, Path(folder) / f"{name}.safetensors", dtype=torch.float32), device=device, dtype=dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ours = seconds_per_forward(quantised, args.size, device, args.repeats)
            peak = {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)} if device.type == "cuda" else {}
            baseline = seconds_per_forward(dense, args.size, device, args.repeats)
            print(json.dumps({"type": name, "device": str(device), "dtype": str(dtype), "blocks": args.blocks, "size": args.size,
                              "bytes_vs_bf16": round(model_bytes(quantised) / bf16_bytes, 3), **peak,
                              "seconds_per_forward": round(ours, 4), "dequantised_once_seconds": round(baseline, 4),
                              "time_vs_dequantised_once": round(ours / baseline, 2)}), flush=True)
            del quantised, dense


if __name__ == "__main__":
    main()
