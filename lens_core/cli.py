"""Command line: `python -m lens_core generate ...` and `python -m lens_core demo --out demo.png`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from . import __version__
from .device import describe, parse_device, resolve_compute
from .errors import LensError, LensInputError
from .placement import TEXT_ENCODER_PLACEMENTS
from .presets import ASPECTS, VARIANTS, bucket_size, check_in_range, guess_variant
from .sampling import check_size
from .text.prompt import replace_lone_surrogates, template_date

DEMO_SIZE = (256, 256)
DIT_FILES = "lens_bf16.safetensors, *_mxfp8, a Lens GGUF (lens_turbo-q8_0.gguf ...), or a transformer/ folder"
TEXT_ENCODER_FILES = "gpt_oss_20b_nvfp4.safetensors, llama.cpp's gpt-oss-20b-mxfp4.gguf, or a text_encoder/ folder"


def _progress(step: int, total: int, _x0) -> None:
    width = 30
    done = width * step // total
    print(f"\r  sampling [{'#' * done}{'.' * (width - done)}] {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)


def _save(images, out: Path, settings: dict) -> list[Path]:
    """Write the PNGs, each to a temporary file renamed into place: an interrupted or failed write never leaves a
    truncated image under the final name. (Not tempfile.mkstemp: its files are private, mode 0600, whatever the umask.)"""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i:02d}{out.suffix}")
        seed = (settings["seed"] + i) & 0xFFFF_FFFF_FFFF_FFFF  # as the noise of image i is seeded
        info = PngInfo()
        info.add_text("lens", json.dumps(dict(settings, seed=seed)))
        info.add_text("parameters", f"{settings['prompt']}\nNegative prompt: {settings.get('negative', '')}\n"
                                    f"Steps: {settings['steps']}, CFG scale: {settings['cfg']}, Seed: {seed}, "
                                    f"Size: {settings['width']}x{settings['height']}, Model: {settings['model']}")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as any new file: the umask decides who reads it
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths


def _int_arg(text: str) -> int:
    """Any whole number (range checks come later, with the same messages as the nodes)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _size(args) -> tuple[int, int]:
    """(height, width): custom --width/--height, else the --aspect/--base bucket; the demo's own default is 256x256."""
    if args.width is not None or args.height is not None:
        if args.width is None or args.height is None:
            raise LensInputError("give both --width and --height, or --aspect.")
        check_in_range("width", args.width)
        check_in_range("height", args.height)
        check_size(args.height, args.width)
        return args.height, args.width
    if args.command == "demo" and args.aspect is None and args.base is None:
        return DEMO_SIZE
    return bucket_size(args.aspect or "1:1", args.base or 1024)


def _check_model_path(path: Path, flag: str, what: str) -> None:
    if not path.exists():
        raise LensInputError(f"{flag} {path}: no such file or folder (expected {what}).")


def _check_output(out: Path) -> None:
    """The PNG can be written: a .png name, not a folder, inside a folder that exists or can be made."""
    if out.is_dir():
        raise LensInputError(f"--out {out} is a folder; give a file name such as {out / 'lens.png'}.")
    if out.suffix.lower() != ".png":
        raise LensInputError(f"--out {out}: give a .png file name (the settings are stored in PNG text chunks).")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise LensInputError(f"--out {out}: cannot write into {existing}.")


def validate(args) -> tuple[int, int]:
    """Check every input before anything is loaded or written; returns (height, width)."""
    for name in ("steps", "cfg"):
        if getattr(args, name) is not None:
            check_in_range(name, getattr(args, name))
    check_in_range("seed", args.seed)
    check_in_range("batch", args.batch)
    size = _size(args)
    _check_output(args.out)
    if args.command == "generate":
        _check_model_path(args.dit, "--dit", f"a Lens denoiser: {DIT_FILES}")
        _check_model_path(args.text_encoder, "--text-encoder", f"GPT-OSS-20B: {TEXT_ENCODER_FILES}")
        _check_model_path(args.vae, "--vae", "flux2-vae.safetensors, ae.safetensors or a vae/ folder")
        template_date(args.date)
        if args.device is not None:
            parse_device(args.device)
        _identify_files(args)
    return size


def _identify_files(args) -> None:
    """Each file is the model its flag asks for, read from the headers before any weights load (8 + 13 GB)."""
    from .dit.loader import check_file as check_dit
    from .text.loader import check_file as check_text_encoder
    from .vae.loader import check_file as check_vae

    for check, path in ((check_dit, args.dit), (check_text_encoder, args.text_encoder), (check_vae, args.vae)):
        check(path)


def _add_sampling_args(p: argparse.ArgumentParser, steps_default: str, cfg_default: str) -> None:
    p.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting",
                   help="what to draw (default: %(default)r)")
    p.add_argument("--negative", default="", help="negative prompt (ignored at cfg 1)")
    p.add_argument("--seed", type=_int_arg, default=0, help="0 .. 2^64-1; image i of a batch uses seed + i")
    p.add_argument("--steps", type=_int_arg, help=f"default: {steps_default}")
    p.add_argument("--cfg", type=float, help=f"default: {cfg_default}")
    p.add_argument("--aspect", choices=ASPECTS, help="trained bucket (width:height), default 1:1")
    p.add_argument("--base", type=int, choices=(1024, 1440), help="bucket base resolution, default 1024")
    p.add_argument("--width", type=_int_arg, help="custom width (multiple of 16); overrides --aspect")
    p.add_argument("--height", type=_int_arg, help="custom height (multiple of 16)")
    p.add_argument("--batch", type=_int_arg, default=1, help="images per run (seeds seed, seed+1, ...)")
    p.add_argument("--out", type=Path, required=True, help="output PNG path")


def build_parser(prog: str = "lens") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Microsoft Lens text-to-image, offline.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images with real Lens weights")
    gen.add_argument("--dit", required=True, type=Path, help=f"denoiser: {DIT_FILES}")
    gen.add_argument("--text-encoder", required=True, type=Path, help=f"text encoder: {TEXT_ENCODER_FILES}")
    gen.add_argument("--vae", required=True, type=Path, help="flux2-vae.safetensors, ae.safetensors or vae/ folder")
    gen.add_argument("--variant", choices=("auto", *VARIANTS), default="auto", help="auto: from the DiT file name")
    gen.add_argument("--device", help="cuda, cuda:1, xpu, mps or cpu (default: the best one available)")
    gen.add_argument("--blocks-on-cpu", type=_int_arg, default=-1,
                     help="block swap: this many of the denoiser's blocks stay in CPU memory and stream to the GPU as they run; "
                          "-1 (default): as many as the GPU's size needs, 0: none")
    gen.add_argument("--text-encoder-device", choices=TEXT_ENCODER_PLACEMENTS, default="auto",
                     help="auto (default): the whole encoder on the GPU where it fits, else gpu_stream_experts (its expert "
                          "banks stay in CPU memory, each routed expert copied over); cpu: run it on the CPU")
    gen.add_argument("--date", default="frozen", help="template date: frozen (2026-05-23, default), today, or YYYY-MM-DD")
    _add_sampling_args(gen, "the variant's (Base 50, Lens 20, Turbo 4)", "the variant's (5.0, or 1.0 for Turbo)")
    demo = sub.add_parser("demo", help="run the whole pipeline on tiny random models (no weights needed; the image is "
                                        f"a coloured pattern, not a picture); {DEMO_SIZE[1]}x{DEMO_SIZE[0]} unless "
                                        "--aspect, --base or --width/--height say otherwise")
    _add_sampling_args(demo, "4, as Lens-Turbo", "1.0, as Lens-Turbo")
    demo.set_defaults(steps=4, cfg=1.0)
    return parser


def _load_pipeline(args):
    """The three models loaded into CPU memory, in the dtype of the device they will take turns on, with the block
    swap and text-encoder placement asked for (or picked from the GPU's size)."""
    from . import load_dit, load_text_encoder, load_tokenizer, load_vae, placement
    from .pipeline import LensPipeline
    from .text.cache import PromptCache

    device, dtype = resolve_compute(args.device, None, what="the Lens models")
    dit = load_dit(args.dit, device="cpu", dtype=dtype)
    variant = guess_variant(str(args.dit), dit.file_metadata) if args.variant == "auto" else args.variant
    encoder = load_text_encoder(args.text_encoder, device="cpu", dtype=dtype)
    vae = load_vae(args.vae, device="cpu", dtype=dtype)
    dit.swap_blocks(placement.blocks_on_cpu(args.blocks_on_cpu, dit, device))
    encoder_placement = placement.text_encoder_placement(args.text_encoder_device, encoder, device)
    encoder.set_expert_streaming(encoder_placement == "gpu_stream_experts")
    for what, model in ((f"denoiser {args.dit}", dit), (f"text encoder {args.text_encoder} ({encoder_placement})", encoder),
                        (f"VAE {args.vae}", vae)):
        print(describe(what, model, device), file=sys.stderr)
    return LensPipeline(dit, encoder, load_tokenizer(args.text_encoder), vae, variant=variant, prompt_cache=PromptCache(),
                        date=args.date, device=device, encoder_device="cpu" if encoder_placement == "cpu" else device)


def main(argv: list[str] | None = None, prog: str = "lens") -> int:
    """Exit codes: 0 done, 1 the image could not be written, 2 a bad input or file, 130 interrupted (Ctrl-C)."""
    args = build_parser(prog).parse_args(argv)
    # a byte that is not UTF-8 arrives as a lone surrogate, which no PNG text chunk can hold
    args.prompt, args.negative = replace_lone_surrogates(args.prompt), replace_lone_surrogates(args.negative)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except LensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    from .pipeline import LensPipeline

    started = time.time()
    height, width = validate(args)
    if args.command == "demo":
        from .demo import demo_models

        print("building tiny random models (demo: the image is noise, the pipeline is real)", file=sys.stderr)
        dit, encoder, tokenizer, vae = demo_models()
        pipe, model_name = LensPipeline(dit, encoder, tokenizer, vae, variant="turbo"), "demo (random)"
        for what, model in (("denoiser", dit), ("text encoder", encoder), ("VAE", vae)):
            print(describe(what, model), file=sys.stderr)
    else:
        pipe = _load_pipeline(args)
        model_name = f"{VARIANTS[pipe.variant].name} ({Path(args.dit).name})"
    steps = VARIANTS[pipe.variant].steps if args.steps is None else args.steps
    cfg = VARIANTS[pipe.variant].cfg if args.cfg is None else args.cfg
    images = pipe(args.prompt, args.negative, steps=steps, cfg=cfg, seed=args.seed, height=height, width=width,
                  batch=args.batch, callback=_progress)
    settings = dict(prompt=args.prompt, negative=args.negative, steps=steps, cfg=cfg, seed=args.seed, width=width,
                    height=height, model=model_name, date=getattr(args, "date", "frozen"))
    try:
        paths = _save(images, args.out, settings)
    except OSError as e:
        print(f"error: could not write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path} ({time.time() - started:.1f}s)", file=sys.stderr)
    return 0
