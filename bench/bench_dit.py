"""Denoiser benchmark: per-forward time, TFLOP/s, share of the GPU's bf16 peak and peak memory; load-time peak RSS.

    python bench/bench_dit.py                      # CUDA: real size at 1024^2; CPU: 4 blocks at 512^2
    python bench/bench_dit.py --blocks 48 --size 1024 --device cuda --batch 2 --mode compiled
    (modes: eager / compiled / compiled_cudagraphs / fp8 / fp8_fast)
    python bench/bench_dit.py --load-test /tmp/lens_bench   # writes a 4.1B-parameter bf16 file once, loads it in a child
    python bench/bench_dit.py --load-test /tmp/lens_bench --load-format fp32-shards   # Microsoft's 2 fp32 shards -> bf16
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_writer import write_streaming  # noqa: E402

from lens_core import DiTConfig, LensDiT  # noqa: E402
from lens_core.dit.loader import to_fp8_weights  # noqa: E402

MODES = ("eager", "compiled", "compiled_cudagraphs", "fp8", "fp8_fast")
# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs this is usually run on, by a part of their name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def forward_flops(cfg: DiTConfig, image_tokens: int, text_tokens: int, batch: int) -> float:
    """Multiply-adds x 2 of one forward: every Linear on its stream's tokens, plus attention (QK^T and PV)."""
    d, m = cfg.hidden, cfg.mlp_hidden
    per_token_per_block = 2 * (4 * d * d + 3 * m * d)
    tokens = image_tokens + text_tokens
    attention_per_block = 4 * tokens * tokens * d
    return batch * cfg.blocks * (per_token_per_block * tokens + attention_per_block)


def benchmark_dit(blocks: int, device, dtype: torch.dtype, mode: str) -> LensDiT:
    """A random real-width denoiser in one of MODES (compiled ones compile at their first forward)."""
    with torch.device(device):
        model = LensDiT(DiTConfig(blocks=blocks)).to(dtype).eval()
    if mode.startswith("fp8"):
        model = to_fp8_weights(model, fast=mode == "fp8_fast")
    if mode.startswith("compiled"):
        model.compile_blocks(cuda_graphs=mode == "compiled_cudagraphs")
    return model


def forward_benchmark(blocks: int, size: int, device: str, dtype: torch.dtype, repeats: int, batch: int = 1, mode: str = "eager") -> dict:
    model = benchmark_dit(blocks, device, dtype, mode)
    cfg = model.config
    h = w = size // 16
    x = torch.randn(batch, h * w, 128, device=device)
    text = torch.randn(batch, 128, 4, 2880, device=device)
    sigma = torch.full((batch,), 0.5, device=device)
    with torch.no_grad():
        first = time.perf_counter()
        model(x, sigma, text, None, (h, w))  # kernels chosen, memory pools filled, compiled modes compiled
        if device == "cuda":
            torch.cuda.synchronize()
        warm_up = time.perf_counter() - first
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, sigma, text, None, (h, w))
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tflops = forward_flops(cfg, h * w, 128, batch) / seconds / 1e12
    result = {"blocks": blocks, "size": size, "batch": batch, "mode": mode, "device": device, "dtype": str(dtype),
              "seconds_per_forward": round(seconds, 4), "seconds_per_forward_48_blocks_estimate": round(seconds * 48 / blocks, 3),
              "tflops": round(tflops, 1), "first_forward_s": round(warm_up, 1), "peak_bytes": peak}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        result |= {"gpu": name, "share_of_bf16_peak": round(tflops / peak_tflops, 3) if peak_tflops else None}
    return result


def full_size_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LensDiT(DiTConfig()).state_dict().items()}


def write_full_size_file(path: Path) -> None:
    """A 4.1B-parameter bf16 Lens DiT in the real key layout, written tensor by tensor (little RAM)."""
    shapes = {k: (torch.bfloat16, shape) for k, shape in full_size_shapes().items()}
    write_streaming(path, shapes, lambda name, dtype, shape: (torch.randn(shape) * 0.02).to(dtype))


def write_full_size_fp32_shards(folder: Path) -> None:
    """Microsoft's layout: transformer/diffusion_pytorch_model-0000k-of-00002.safetensors (fp32) + index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(full_size_shapes().items())
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"diffusion_pytorch_model-{k:05d}-of-00002.safetensors"
        write_streaming(folder / shard, {n: (torch.float32, shape) for n, shape in part},
                        lambda name, dtype, shape: torch.randn(shape) * 0.02)
        weight_map.update({n: shard for n, _ in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def load_child(path: str) -> None:
    from lens_core import load_dit

    start = time.perf_counter()
    model = load_dit(path, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_seconds": round(seconds, 1), "model_bytes": size, "peak_rss_bytes": peak, "peak_over_model": round(peak / size, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--blocks", type=int, default=48 if cuda else 4)
    parser.add_argument("--size", type=int, default=1024 if cuda else 512)
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="2 = one CFG step")
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--load-test", type=Path, help="folder for the full-size file (written once, 8.2 GB)")
    parser.add_argument("--load-format", choices=("bf16", "fp32-shards"), default="bf16")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        return load_child(args.load_child)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(json.dumps(forward_benchmark(args.blocks, args.size, args.device, dtype, args.repeats, args.batch, args.mode)))
    if args.load_test:
        args.load_test.mkdir(parents=True, exist_ok=True)
        if args.load_format == "bf16":
            path, write = args.load_test / "lens_bf16_random.safetensors", write_full_size_file
        else:
            path, write = args.load_test / "transformer", write_full_size_fp32_shards
        if not path.exists():
            start = time.perf_counter()
            write(path)
            print(f"wrote {path} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--load-child", str(path)], check=True)


if __name__ == "__main__":
    main()
