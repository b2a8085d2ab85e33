"""This pack's denoiser against the reference (the diffusers port of Microsoft's Lens), side by side in one process.

Both models get the same random real-width weights and the same inputs; the script first checks that they
compute the same velocity, then times their forwards interleaved (so machine noise hits both alike) and
prints the median of each and the ratio pack / reference (below 1 = the pack is faster).

    python bench/bench_vs_reference.py --diffusers-src ~/diffusers/src            # CPU: 4 blocks, 512^2, fp32
    python bench/bench_vs_reference.py --device cuda --blocks 48 --size 1024 --dtype bf16 --batch 2

The reference ships in diffusers' Lens pull request (`LensTransformer2DModel`), not yet in a release:
install that diffusers, or pass `--diffusers-src` pointing at a checkout's `src` folder.
The pack runs with text_mask="first_block", the diffusers port's masking, so padded prompts agree too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lens_core import DiTConfig, LensDiT  # noqa: E402


def import_reference(diffusers_src: Path | None):
    if diffusers_src is not None:
        sys.path.insert(0, str(diffusers_src))
    try:
        from diffusers import LensTransformer2DModel
    except ImportError as error:
        sys.exit(f"The reference is not importable ({error}). It is diffusers' LensTransformer2DModel, from the Lens "
                 "pull request of huggingface/diffusers: install that diffusers or pass --diffusers-src <checkout>/src.")
    return LensTransformer2DModel


def build_pair(blocks: int, device: str, dtype: torch.dtype, reference_class) -> tuple[LensDiT, torch.nn.Module]:
    """The pack's model with random weights, and the reference loaded with the very same tensors (same key names),
    both built on `device` (a real-size pair is 2 x 4.1B parameters)."""
    torch.manual_seed(0)
    with torch.device(device):
        pack = LensDiT(DiTConfig(blocks=blocks), text_mask="first_block").to(dtype)
        reference = reference_class(num_layers=blocks)
    for name, tensor in pack.state_dict().items():
        if "norm" in name:
            tensor.normal_(1.0, 0.1)  # norm gains away from 1, so a norm in the wrong place shows
        elif name.endswith("bias"):
            tensor.normal_(0.0, 0.02)
    # Only real tensors take the dtype: the reference keeps its RoPE table complex (a plain .to(dtype) would drop
    # the imaginary part).
    reference._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    missing, unexpected = reference.load_state_dict(pack.state_dict(), strict=False)
    if missing or unexpected:
        sys.exit(f"the reference's keys differ from the pack's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return pack.eval(), reference.eval()


def make_inputs(batch: int, size: int, text_tokens: int, device: str, dtype: torch.dtype):
    """Image tokens, sigma, text features and a mask whose last row is padded by a quarter (a shorter negative)."""
    h = w = size // 16
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, h * w, 128, generator=generator).to(device, dtype)
    sigma = torch.linspace(0.9, 0.3, batch).to(device)
    text = torch.randn(batch, text_tokens, 4, 2880, generator=generator).to(device, dtype)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    if batch > 1:
        mask[-1, text_tokens * 3 // 4:] = False
        text[-1, text_tokens * 3 // 4:] = 0
    return x, sigma, text, mask, (h, w)


def run_pack(pack, inputs, pack_mask):
    """The pack's forward with the mask its sampler would pass: None when no text key is padded (decided once)."""
    x, sigma, text, _, grid = inputs
    return pack(x, sigma, text, pack_mask, grid)


def run_reference(reference, inputs):
    x, sigma, text, mask, (h, w) = inputs
    layers = [text[:, :, i] for i in range(text.shape[2])]
    return reference(x, layers, mask, sigma.to(x.dtype), [(1, h, w)] * x.shape[0], return_dict=False)[0]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    parser.add_argument("--diffusers-src", type=Path, help="a diffusers checkout's src folder holding the Lens port")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--blocks", type=int, default=48 if cuda else 4)
    parser.add_argument("--size", type=int, default=1024 if cuda else 512)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="2 = one CFG step (the second prompt padded)")
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pack, reference = build_pair(args.blocks, args.device, dtype, import_reference(args.diffusers_src))
    inputs = make_inputs(args.batch, args.size, args.text_tokens, args.device, dtype)
    pack_mask = None if bool(inputs[3].all()) else inputs[3]  # one host sync here, none in the timed loop
    pack_times, reference_times = [], []
    with torch.no_grad():
        ours, theirs = run_pack(pack, inputs, pack_mask).float(), run_reference(reference, inputs).float()
        difference = ((ours - theirs).norm() / theirs.norm()).item()
        for _ in range(args.repeats):
            pack_times.append(timed(lambda: run_pack(pack, inputs, pack_mask), args.device))
            reference_times.append(timed(lambda: run_reference(reference, inputs), args.device))
    pack_s, reference_s = statistics.median(pack_times), statistics.median(reference_times)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "blocks": args.blocks, "size": args.size, "batch": args.batch, "dtype": args.dtype,
              "relative_l2_pack_vs_reference": float(f"{difference:.2e}"),
              "pack_s": round(pack_s, 4), "reference_s": round(reference_s, 4),
              "pack_over_reference": round(pack_s / reference_s, 3),
              "pack_runs": [round(t, 4) for t in pack_times], "reference_runs": [round(t, 4) for t in reference_times]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
