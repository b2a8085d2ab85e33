"""GGUF benchmark: per quantisation type, the weight bytes against bf16, the forward time against the same weights
dequantised once (a dense model), and the peak memory of each (one JSON line per type).

    python bench/bench_gguf.py                                   # CUDA: real width, 4 blocks, 1024^2 tokens
    python bench/bench_gguf.py --device cpu --blocks 2 --size 256  # a CPU run

Random real-width weights (quantised by gguf where it can, random blocks of the K and IQ types: the speed does not
depend on their values) are written once; each model then loads and runs in a child process of its own, so that
`peak_rss_gb` (CPU) is that model's alone; on CUDA `peak_allocated_gb` is the GPU memory peak of its forwards
(weights, one dequantised layer at a time, activations). `bytes_vs_bf16` is the GGUF model's weight bytes over the
bf16 model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import seconds_per_forward  # noqa: E402
from model_files import random_dit_state, write_gguf, write_single  # noqa: E402

from lens_core import DiTConfig, load_dit  # noqa: E402
from lens_core.placement import weight_bytes as model_bytes  # noqa: E402

TYPES = {"Q8_0": 8, "Q6_K": 14, "Q5_K": 13, "Q4_K": 12, "Q4_0": 2, "IQ4_XS": 23}


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM (Linux; reset by exec, unlike ru_maxrss, which a child started
    from a large parent inherits), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)


def measure(path: str, device: str, size: int, repeats: int) -> None:
    """In a child: load one model file, time its forward, print what it took."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = load_dit(path, device=device, dtype=dtype)
    cfg, tokens = dit.config, (size // 16) ** 2
    args = (torch.randn(1, tokens, cfg.in_channels, device=device), torch.tensor([0.5], device=device),
            torch.randn(1, 128, cfg.text_layers, cfg.text_width, device=device), None, (size // 16, size // 16))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the forwards' peak, not the load's (the warm-up forward is one of them)
    result = {"seconds_per_forward": seconds_per_forward(dit, args, repeats, device), "weight_bytes": model_bytes(dit),
              "peak_rss_gb": peak_rss_gb()}
    if device.type == "cuda":
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    print(json.dumps(result))


def in_child(path: Path, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--device", args.device, "--size", str(args.size),
                          "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child, args.device, args.size, args.repeats)
    state = random_dit_state(DiTConfig(blocks=args.blocks))
    bf16_bytes = sum(t.numel() * 2 for t in state.values())
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name in args.types:
            reference = write_gguf(Path(folder) / f"{name}.gguf", state, TYPES[name], np.random.default_rng(0))
            files[name] = Path(folder) / f"{name}.gguf", write_single(reference, Path(folder) / f"{name}.safetensors", dtype=torch.float32)
        del state
        for name, (gguf_file, dense_file) in files.items():
            ours, dense = in_child(gguf_file, args), in_child(dense_file, args)
            print(json.dumps({"type": name, "device": args.device, "blocks": args.blocks, "size": args.size,
                              "bytes_vs_bf16": round(ours["weight_bytes"] / bf16_bytes, 3),
                              "seconds_per_forward": round(ours["seconds_per_forward"], 4),
                              "dequantised_once_seconds": round(dense["seconds_per_forward"], 4),
                              "time_vs_dequantised_once": round(ours["seconds_per_forward"] / dense["seconds_per_forward"], 2),
                              **{f"{key}": ours[key] for key in ("peak_rss_gb", "peak_allocated_gb") if key in ours},
                              **{f"dense_{key}": dense[key] for key in ("peak_rss_gb", "peak_allocated_gb") if key in dense}}),
                  flush=True)


if __name__ == "__main__":
    main()
