"""LoRA benchmark: forward time of the denoiser with LoRAs as side paths on every Linear, against the base.

    python bench/bench_lora.py                     # CUDA: 48 blocks at 1024^2; CPU: 4 blocks at 512^2
    python bench/bench_lora.py --device cpu --blocks 2 --size 256 --ranks 16

Also prints the bytes the side paths add against what merging would copy (every patched layer's weight).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lens_core import DiTConfig, LensDiT, apply_loras  # noqa: E402
from lens_core.device import default_device, resolve_compute  # noqa: E402
from lens_core.dit.lora import LoRA, LoRALayer, linear_names  # noqa: E402


def seconds_per_forward(dit, inputs, repeats: int, device: torch.device) -> float:
    with torch.no_grad():
        dit(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dit(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--blocks", type=int, default=48 if cuda else 4)
    parser.add_argument("--size", type=int, default=1024 if cuda else 512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = resolve_compute(args.device, None, "the benchmark denoiser")
    with torch.device(device):
        dit = LensDiT(DiTConfig(blocks=args.blocks)).to(dtype).eval()
    h = w = args.size // 16
    inputs = (torch.randn(1, h * w, 128, device=device), torch.tensor([0.5], device=device),
              torch.randn(1, 128, 4, 2880, device=device), None, (h, w))
    base = seconds_per_forward(dit, inputs, args.repeats, device)
    targets = linear_names(dit)
    merged_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    for rank in args.ranks:
        lora = LoRA({name: LoRALayer(torch.randn(rank, m.in_features) * 0.01, torch.randn(m.out_features, rank) * 0.01, 1.0)
                     for name, m in targets.items()}, "random", [])
        patched = apply_loras(dit, [(lora, 1.0)])
        side_bytes = sum(t.numel() * t.element_size() for name, t in patched.named_parameters() if ".downs." in name or ".ups." in name)
        with_lora = seconds_per_forward(patched, inputs, args.repeats, device)
        print(json.dumps({"device": str(device), "dtype": str(dtype), "blocks": args.blocks, "size": args.size, "rank": rank,
                          "layers": len(targets), "base_s": round(base, 4), "lora_s": round(with_lora, 4),
                          "overhead": round(with_lora / base - 1, 3), "side_path_mb": round(side_bytes / 1e6, 1),
                          "merge_copy_mb": round(merged_bytes / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
