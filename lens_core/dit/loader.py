"""`load_dit`: every published Lens denoiser file -> a ready `LensDiT`.

Accepted: a single `.safetensors` (bare keys or the `model.diffusion_model.` prefix of combined
ComfyUI checkpoints), Microsoft's diffusers `transformer/` folder of fp32 shards (+ index and
config.json), Comfy-Org's `*_mxfp8` files (float8 weights + E8M0 block scales, kept quantised), and
`.gguf` files with the state-dict names (as ComfyUI-GGUF's converter writes them; quantised Linear
weights stay quantised, see quant.GGUFLinear).
Sizes are read from tensor shapes, so test-sized and real models load through the same code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import gguf_quants
from ..checkpoint.identify import find_key_prefix
from ..checkpoint.safetensors_reader import Checkpoint, open_component
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint, missing_numbers
from ..device import resolve_compute
from ..errors import LensFileError, LensInputError
from .model import DiTConfig, LensDiT
from .quant import (
    FP8_WEIGHT_DTYPES,
    MXFP8_FORMAT,
    GGUFLinear,
    MXFP8Linear,
    has_fp8_tensor_cores,
    read_comfy_quant,
    to_fp8_weights,
)

log = logging.getLogger("lens_core")

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_MARKERS = ("transformer_blocks.0.attn.norm_added_q.weight", "transformer_blocks.0.img_mlp.w1.weight")
_EXPECTED = (
    "a Lens denoiser: Comfy-Org's lens_bf16 / lens_turbo_bf16 / *_mxfp8 .safetensors "
    "(models/diffusion_models) or Microsoft's transformer/ folder of diffusion_pytorch_model shards"
)


def _key_prefix(ckpt: Checkpoint) -> str:
    return find_key_prefix(ckpt, _PREFIXES, _MARKERS, "a Lens denoiser", _EXPECTED)


def check_file(path: str | os.PathLike) -> None:
    """Raise LensFileError unless `path` holds a Lens denoiser, from the file headers alone (no weights read)."""
    _key_prefix(open_component(path, "transformer", "diffusion_pytorch_model"))


_CONFIG_KEYS = ("img_in.weight", "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.img_mlp.w1.weight",
                "txt_norm.0.weight", "proj_out.weight", "time_text_embed.timestep_embedder.linear_1.weight")


def config_from_checkpoint(ckpt: Checkpoint, prefix: str = "") -> DiTConfig:
    """The DiT sizes implied by the tensor shapes (checked against each other at fill time)."""
    def shape(name):
        return ckpt.shape(prefix + name)

    ckpt.require(prefix + key for key in _CONFIG_KEYS)
    block_ids = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d{1,9})\.", k))}
    text_ids = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(re.escape(prefix) + r"txt_norm\.(\d{1,9})\.weight$", k))}
    if block_ids != set(range(len(block_ids))):
        raise LensFileError(f"{ckpt.name}: the file numbers its transformer blocks up to {max(block_ids)}, but "
                            f"{missing_numbers(block_ids, max(block_ids) + 1)} are missing. "
                            "The file is incomplete or damaged: download it again.")
    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if hidden % head_dim:
        raise LensFileError(f"{ckpt.name}: hidden size {hidden} is not a multiple of the head size {head_dim}.")
    return DiTConfig(
        hidden=hidden,
        heads=hidden // head_dim,
        head_dim=head_dim,
        blocks=len(block_ids),
        mlp_hidden=shape("transformer_blocks.0.img_mlp.w1.weight")[0],
        text_width=shape("txt_norm.0.weight")[0],
        text_layers=len(text_ids),
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0],
        time_channels=shape("time_text_embed.timestep_embedder.linear_1.weight")[1],
    )


def _check_config_json(ckpt: Checkpoint, cfg: DiTConfig) -> None:
    """Microsoft's folder ships a config.json; contradictions with the shapes are caught here."""
    folder = Path(ckpt.name)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        return
    try:
        declared = json.loads(config_file.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError):
        declared = None
    if not isinstance(declared, dict):
        raise LensFileError(f"{config_file}: this is not a JSON object, so it is not the model's config.json. "
                            "Download it again with the denoiser's other files.")
    checks = {"num_layers": cfg.blocks, "num_attention_heads": cfg.heads, "attention_head_dim": cfg.head_dim, "enc_hidden_dim": cfg.text_width}
    for field, actual in checks.items():
        if field in declared and declared[field] != actual:
            raise LensFileError(
                f"{config_file}: says {field} = {declared[field]}, but the weights beside it have {actual}. "
                "The folder mixes files of different models: download it again."
            )


def _quantised_linears(ckpt: Checkpoint, prefix: str) -> dict[str, str]:
    """Linear module name -> comfy_quant format, for every layer the file stores quantised."""
    formats = {}
    for key in ckpt.keys():
        if key.startswith(prefix) and key.endswith(".comfy_quant"):
            module = key[len(prefix):-len(".comfy_quant")]
            formats[module] = read_comfy_quant(ckpt.read(key), f"{ckpt.name}: {key}")
    return formats


def _swap_in_quantised(model: LensDiT, formats: dict[str, str], file_name: str) -> None:
    for module_name, fmt in formats.items():
        if fmt != MXFP8_FORMAT:
            raise LensFileError(
                f"{file_name}: layer {module_name} is quantised as {fmt!r}; this pack reads bf16, fp32 and mxfp8 "
                "Lens files. Use lens_bf16.safetensors or lens_mxfp8.safetensors from Comfy-Org/Lens."
            )
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        setattr(parent, leaf, MXFP8Linear(old.in_features, old.out_features, old.bias is not None, device="meta"))


def _swap_in_gguf(model: LensDiT, ckpt: Checkpoint, prefix: str) -> set[str]:
    """Replace the Linears whose weights a GGUF file stores quantised by GGUFLinear (kept quantised); returns their
    weights' file keys. Other quantised tensors are dequantised when read."""
    kept = set()
    for name, module in list(model.named_modules()):
        key = prefix + name + ".weight"
        qtype = ckpt.gguf_type(key) if key in ckpt else None
        if qtype is None or not isinstance(module, nn.Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if module.in_features % gguf_quants.TYPES[qtype][1]:
            raise LensFileError(f"{ckpt.name}: {key} is {gguf_quants.type_name(qtype)}, whose blocks do not divide its "
                                f"{module.in_features} inputs. The file is damaged or not a Lens denoiser.")
        setattr(parent, leaf, GGUFLinear(module.in_features, module.out_features, module.bias is not None, qtype, device="meta"))
        kept.add(key)
    return kept


def load_dit(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             text_mask: str = "every_block", weight_dtype: str | None = None, compile: bool = False,
             attention: str = "sdpa") -> LensDiT:
    """Load a Lens denoiser from any published layout (see module docstring).

    device: default the best accelerator (CUDA, XPU, MPS), else CPU. dtype: the compute dtype, bfloat16 where
    the device computes it natively, float32 elsewhere; float16 is refused (the model overflows in fp16).
    text_mask: "every_block" (ComfyUI native, musubi-tuner; the default) or "first_block" (the diffusers
    port, which the golden tensors come from); see `LensDiT`.
    weight_dtype: None (weights in `dtype`), "fp8_e4m3fn" (block Linears stored in fp8 with per-row scales,
    0.67x the bytes, computed in `dtype`) or "fp8_e4m3fn_fast" (the same, multiplied fp8 x fp8 on GPUs with
    compute capability 8.9 and newer). Modulation and top-level layers keep `dtype` (see quant.FP8_KEEP).
    compile: compile the blocks with torch.compile (a warm-up at load; see `LensDiT.compile_blocks`).
    attention: "sdpa" (default) or "sage" (SageAttention when installed; see `LensDiT.use_attention`).
    """
    device, dtype = resolve_compute(device, dtype, what="the Lens denoiser")
    if weight_dtype not in (None, *FP8_WEIGHT_DTYPES):
        raise LensInputError(f"weight_dtype {weight_dtype!r} is not offered; use None (the compute dtype) or one of "
                             f"{', '.join(FP8_WEIGHT_DTYPES)}.")
    ckpt = open_component(path, "transformer", "diffusion_pytorch_model")
    prefix = _key_prefix(ckpt)
    cfg = config_from_checkpoint(ckpt, prefix)
    _check_config_json(ckpt, cfg)
    with torch.device("meta"):
        model = LensDiT(cfg, text_mask=text_mask)
    model.use_attention(attention)  # before reading 8 GB: a missing package is reported at once
    _swap_in_quantised(model, _quantised_linears(ckpt, prefix), ckpt.name)
    kept_quantised = _swap_in_gguf(model, ckpt, prefix)
    check_against_checkpoint(model, ckpt.keys(), lambda key: ckpt.stored_shape(key) if key in kept_quantised else ckpt.shape(key),
                             ckpt.name, prefix)
    # fp8 layers are quantised on the CPU, so the device never holds the full-precision weights.
    model = fill_from_checkpoint(model, ckpt.read, "cpu" if weight_dtype else device, dtype, prefix)
    if weight_dtype:
        fast = weight_dtype.endswith("_fast")
        model = to_fp8_weights(model, fast).to(device)
        if fast and not has_fp8_tensor_cores(device):
            log.info("Lens: %s has no fp8 tensor cores (NVIDIA compute capability 8.9+ has them): the weights stay fp8, "
                     "the matmuls run in %s", device, str(dtype).removeprefix("torch."))
    model.source = ckpt.name
    model.file_metadata = ckpt.metadata
    if compile:
        model.compile_blocks()
    return model
