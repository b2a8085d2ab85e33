"""VAE benchmark: decode time and peak memory at 1024^2 and 1440^2 with real-size random weights,
untiled and tiled. Each measurement runs in its own process so peak RSS is its own.

    python bench/bench_vae.py                 # CUDA (bf16) when available, else CPU (fp32)
    python bench/bench_vae.py --sizes 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lens_core.vae.autoencoder import LensVAE  # noqa: E402
from lens_core.vae.model import FluxVAEModel, VAEConfig  # noqa: E402


def measure(size: int, tiled: bool, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxVAEModel(VAEConfig()).to(dtype)
    vae = LensVAE(model)
    latent = torch.randn(1, 128, size // 16, size // 16)
    if device == "cuda":
        vae.decode(torch.randn(1, 128, 16, 16), tile=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    image = vae.decode(latent, tile=tiled)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"size": size, "tiled": tiled, "device": device, "seconds": round(seconds, 2), "peak_gb": round(peak, 2),
            "image": list(image.shape)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1440])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1] == "tiled", args.device)), flush=True)
        return
    for size in args.sizes:
        for mode in ("untiled", "tiled"):
            subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(size), mode], check=True)


if __name__ == "__main__":
    main()
