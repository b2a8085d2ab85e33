"""Command line: `python -m lens_core generate ...` and `python -m lens_core demo --out demo.png`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .errors import LensError
from .presets import ASPECTS, VARIANTS, bucket_size, guess_variant


def _progress(step: int, total: int, _x0) -> None:
    width = 30
    done = width * step // total
    print(f"\r  sampling [{'#' * done}{'.' * (width - done)}] {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)


def _save(images, out: Path, settings: dict) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i:02d}{out.suffix}")
        info = PngInfo()
        info.add_text("lens", json.dumps(dict(settings, seed=settings["seed"] + i)))
        info.add_text("parameters", f"{settings['prompt']}\nNegative prompt: {settings.get('negative', '')}\n"
                                    f"Steps: {settings['steps']}, CFG scale: {settings['cfg']}, Seed: {settings['seed'] + i}, "
                                    f"Size: {settings['width']}x{settings['height']}, Model: {settings['model']}")
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths


def _size(args) -> tuple[int, int]:
    if args.width or args.height:
        if not (args.width and args.height):
            raise LensError("give both --width and --height, or --aspect.")
        return args.height, args.width
    return bucket_size(args.aspect, args.base)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    p.add_argument("--negative", default="", help="negative prompt (ignored at cfg 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="default: the variant's (Base 50, Lens 20, Turbo 4)")
    p.add_argument("--cfg", type=float, help="default: the variant's (5.0, or 1.0 for Turbo)")
    p.add_argument("--aspect", choices=ASPECTS, default="1:1", help="trained bucket (width:height)")
    p.add_argument("--base", type=int, choices=(1024, 1440), default=1024, help="bucket base resolution")
    p.add_argument("--width", type=int, help="custom width (multiple of 16); overrides --aspect")
    p.add_argument("--height", type=int, help="custom height (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="images per run (seeds seed, seed+1, ...)")
    p.add_argument("--out", type=Path, required=True, help="output PNG path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lens_core", description="Microsoft Lens text-to-image, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images with real Lens weights")
    gen.add_argument("--dit", required=True, type=Path, help="denoiser: lens_bf16.safetensors, *_mxfp8, or transformer/ folder")
    gen.add_argument("--text-encoder", required=True, type=Path, help="gpt_oss_20b_nvfp4.safetensors or text_encoder/ folder")
    gen.add_argument("--vae", required=True, type=Path, help="flux2-vae.safetensors, ae.safetensors or vae/ folder")
    gen.add_argument("--variant", choices=("auto", *VARIANTS), default="auto", help="auto: from the DiT file name")
    gen.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    gen.add_argument("--date", default="frozen", help="template date: frozen (2026-05-23, default), today, or YYYY-MM-DD")
    _add_sampling_args(gen)
    demo = sub.add_parser("demo", help="run the whole pipeline on tiny random models (no weights needed)")
    _add_sampling_args(demo)
    demo.set_defaults(width=256, height=256, steps=4, cfg=5.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except LensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .pipeline import LensPipeline
    from .text.cache import PromptCache

    started = time.time()
    height, width = _size(args)
    if args.command == "demo":
        from .demo import demo_models

        print("building tiny random models (demo: the image is noise, the pipeline is real)", file=sys.stderr)
        dit, encoder, tokenizer, vae = demo_models()
        pipe, model_name = LensPipeline(dit, encoder, tokenizer, vae, variant="lens"), "demo (random)"
    else:
        from . import load_dit, load_text_encoder, load_tokenizer, load_vae

        print(f"loading {args.dit}", file=sys.stderr)
        dit = load_dit(args.dit, device=args.device)
        variant = guess_variant(str(args.dit), dit.file_metadata) if args.variant == "auto" else args.variant
        print(f"loading {args.text_encoder}", file=sys.stderr)
        encoder = load_text_encoder(args.text_encoder, device=args.device)
        tokenizer = load_tokenizer(args.text_encoder)
        print(f"loading {args.vae}", file=sys.stderr)
        vae = load_vae(args.vae, device=args.device)
        pipe = LensPipeline(dit, encoder, tokenizer, vae, variant=variant, prompt_cache=PromptCache(), date=args.date)
        model_name = f"{VARIANTS[variant].name} ({Path(args.dit).name})"
    steps = args.steps or VARIANTS[pipe.variant].steps
    cfg = VARIANTS[pipe.variant].cfg if args.cfg is None else args.cfg
    images = pipe(args.prompt, args.negative, steps=steps, cfg=cfg, seed=args.seed, height=height, width=width,
                  batch=args.batch, callback=_progress)
    settings = dict(prompt=args.prompt, negative=args.negative, steps=steps, cfg=cfg, seed=args.seed, width=width,
                    height=height, model=model_name, date=getattr(args, "date", "frozen"))
    for path in _save(images, args.out, settings):
        print(f"wrote {path} ({time.time() - started:.1f}s)", file=sys.stderr)
    return 0
