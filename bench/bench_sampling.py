"""Sampling benchmark: the whole `lens_core.sample` loop (the denoiser's time per image), one JSON line per run.

    python bench/bench_sampling.py                       # CUDA: real size, Turbo 4 steps and Lens 20 steps CFG 5 at 1024^2 and 1440^2
    python bench/bench_sampling.py --mode compiled           # or compiled_cudagraphs, fp8_fast (see bench_dit.py --mode)
    python bench/bench_sampling.py --device cpu --blocks 2 --sizes 256 --lens-steps 2   # a CPU smoke run

Random real-size weights (the speed does not depend on their values); 128 positive text tokens, the empty
negative (all masked) for CFG, as the sampler nodes run it. Noise is drawn on the CPU, as in the nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import MODES, benchmark_dit  # noqa: E402

from lens_core import make_noise, sample  # noqa: E402
from lens_core.device import default_device, resolve_compute  # noqa: E402


def run(dit, size: int, steps: int, cfg: float, text_tokens: int, device: torch.device, batch_cfg: bool = True) -> dict:
    features = torch.randn(1, text_tokens, dit.config.text_layers, dit.config.text_width)
    cond = (features, torch.ones(1, text_tokens, dtype=torch.bool))
    uncond = (torch.zeros(1, 0, dit.config.text_layers, dit.config.text_width), torch.zeros(1, 0, dtype=torch.bool))
    noise = make_noise(0, (1, 128, size // 16, size // 16))
    with torch.no_grad():
        sample(dit, noise, cond, uncond, steps=1, cfg=cfg, batch_cfg=batch_cfg)  # warm-up: kernels chosen, memory pools filled
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sample(dit, noise, cond, uncond, steps=steps, cfg=cfg, batch_cfg=batch_cfg)
        out.cpu()
    seconds = time.perf_counter() - start
    result = {"size": size, "steps": steps, "cfg": cfg, "seconds": round(seconds, 3),
              "seconds_per_forward": round(seconds / (steps * (2 if cfg != 1.0 else 1)), 4)}
    if device.type == "cuda":
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--dtype", default=None, help="bf16 / fp32 (default: the device's)")
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1440])
    parser.add_argument("--turbo-steps", type=int, default=4)
    parser.add_argument("--lens-steps", type=int, default=20)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--blocks-on-cpu", type=int, default=0, help="block swap: blocks kept in CPU memory")
    parser.add_argument("--separate-cfg", action="store_true",
                        help="CFG's two passes one after the other, each on unpadded text with no mask (sample(batch_cfg=False))")
    args = parser.parse_args()
    device, dtype = resolve_compute(args.device, args.dtype, "the benchmark denoiser")
    dit = benchmark_dit(args.blocks, device, dtype, args.mode)
    dit.swap_blocks(args.blocks_on_cpu)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    for size in args.sizes:
        for variant, steps, cfg in (("turbo", args.turbo_steps, 1.0), ("lens", args.lens_steps, 5.0)):
            result = run(dit, size, steps, cfg, args.text_tokens, device, batch_cfg=not args.separate_cfg)
            print(json.dumps({"variant": variant, "mode": args.mode, "blocks_on_cpu": args.blocks_on_cpu, "separate_cfg": args.separate_cfg,
                              "device": name, "dtype": str(dtype), "blocks": args.blocks, **result}), flush=True)


if __name__ == "__main__":
    main()
