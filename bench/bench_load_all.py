"""System RAM while loading all three Lens models, as the loader node does (onto the CPU, in the GPU's dtype).

Writes full-size random files once into FOLDER (the 4.1B-parameter denoiser in bf16, 8.2 GB; GPT-OSS-20B with
MXFP4 expert banks in Microsoft's 3-shard layout, 13 GB; the FLUX.2 VAE, 0.17 GB), then loads them in a child
process one after the other and prints, after each, the model's bytes, the process's peak RSS and that peak over
the bytes of every model loaded so far (the goal: at most 1.1). With --device cuda it also times each model's
moves to the GPU and back (what a run costs when the models take turns on a small GPU), in GB/s, three ways in the
same run: from ordinary memory (the page-locked budget set to 0: the baseline), the first trip with the budget
(up from ordinary memory, down into new page-locked copies), and every later trip (up from the page-locked copies,
down without a copy).

    python bench/bench_load_all.py /tmp/lens_load_bench            # bf16, as on a GPU machine
    python bench/bench_load_all.py /tmp/lens_load_bench --device cuda
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
from bench_dit import write_full_size_file  # noqa: E402
from bench_text_encoder import write_checkpoint  # noqa: E402

DIT_FILE, TE_FOLDER, VAE_FILE = "lens_bf16_random.safetensors", "text_encoder", "flux2-vae_random.safetensors"


def write_vae(path: Path) -> None:
    from safetensors.torch import save_file

    from lens_core.vae.model import FluxVAEModel, VAEConfig

    torch.manual_seed(0)
    model = FluxVAEModel(VAEConfig())
    save_file({k: v.to(torch.bfloat16 if v.is_floating_point() and "bn." not in k else v.dtype).contiguous()
               for k, v in model.state_dict().items()}, str(path))


def write_missing(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in ((DIT_FILE, write_full_size_file), (TE_FOLDER, write_checkpoint), (VAE_FILE, write_vae)):
        if not (folder / name).exists():
            start = time.perf_counter()
            write(folder / name)
            print(f"wrote {folder / name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_place(model, device: str) -> float:
    """Seconds to place a model on `device` the way LensPipeline and the command line do (lens_core/placement.py)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.place(device)
    torch.cuda.synchronize()  # a move may return before its copies end
    return time.perf_counter() - start


def round_trips(model, device: str, nbytes: int) -> dict:
    """GB/s of each direction, twice (the first trip up is from the file's freshly read memory)."""
    trips = {"first": (timed_place(model, device), timed_place(model, "cpu")),
             "later": (timed_place(model, device), timed_place(model, "cpu"))}
    return {f"{name}_{way}_gb_per_s": round(nbytes / seconds / 1e9, 1)
            for name, pair in trips.items() for way, seconds in zip(("up", "down"), pair)}


def child(folder: Path, dtype: torch.dtype, device: str) -> None:
    from lens_core import load_dit, load_text_encoder, load_vae
    from lens_core.placement import weight_bytes

    loaders = (("denoiser", lambda: load_dit(folder / DIT_FILE, device="cpu", dtype=dtype)),
               ("text encoder", lambda: load_text_encoder(folder / TE_FOLDER, device="cpu", dtype=dtype)),
               ("VAE", lambda: load_vae(folder / VAE_FILE, device="cpu", dtype=dtype)))
    held, total = [], 0
    for what, load in loaders:
        start = time.perf_counter()
        model = load()
        held.append(model)
        size = weight_bytes(getattr(model, "model", model))
        total += size
        report = {"model": what, "dtype": str(dtype), "load_seconds": round(time.perf_counter() - start, 1),
                  "model_gb": round(size / 1e9, 2), "all_loaded_gb": round(total / 1e9, 2),
                  "peak_rss_gb": round(peak_rss() / 1e9, 2), "peak_over_loaded": round(peak_rss() / total, 3)}
        if device != "cpu":
            moved = weight_bytes(getattr(model, "model", model), skip=getattr(model, "keeps_on_cpu", lambda: ())())
            report |= {"moved_gb": round(moved / 1e9, 2), **round_trips(model, device, moved)}
        print(json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cpu", help="cuda: also time each model's move to the GPU and back")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.child:
        return child(args.folder, dtype, args.device)
    write_missing(args.folder)
    subprocess.run([sys.executable, __file__, str(args.folder), "--dtype", args.dtype, "--device", args.device, "--child"], check=True)


if __name__ == "__main__":
    main()
