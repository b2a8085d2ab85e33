"""`load_dit`: every published Lens denoiser file -> a ready `LensDiT`.

Accepted: a single `.safetensors` (bare keys or the `model.diffusion_model.` prefix of combined
ComfyUI checkpoints), Microsoft's diffusers `transformer/` folder of fp32 shards (+ index and
config.json), Comfy-Org's `*_mxfp8` files (float8 weights + E8M0 block scales, kept packed), and
`.gguf` files with the state-dict names (bare, as ComfyUI-GGUF's converter writes them, or under
stable-diffusion.cpp's `model.diffusion_model.`; quantised Linear weights stay packed).
Sizes are read from tensor shapes, so test-sized and real models load through the same code.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.files import json_object, read_json_object, short
from ..checkpoint.identify import find_key_prefix
from ..checkpoint.source import ShardSet, open_component
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint, missing_numbers
from ..device import resolve_compute
from ..errors import LensFileError, LensInputError
from ..quant import formats
from ..quant.layers import PackedLinear, replace_module
from .model import DiTConfig, LensDiT

log = logging.getLogger("lens_core")

FP8_WEIGHT_DTYPES = ("fp8_e4m3fn", "fp8_e4m3fn_fast")
# Layers that stay in the compute dtype under fp8 weights: the modulation layers (a published uint4 study of Lens
# found quantised modulation causes grid artifacts; they are a third of the weights, but they scale every
# activation of a block) and the small top-level layers.
FP8_KEEP = ("img_mod", "txt_mod")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_MARKERS = ("transformer_blocks.0.attn.norm_added_q.weight", "transformer_blocks.0.img_mlp.w1.weight")
_EXPECTED = (
    "a Lens denoiser: Comfy-Org's lens_bf16 / lens_turbo_bf16 / *_mxfp8 .safetensors "
    "(models/diffusion_models), a Lens GGUF, or Microsoft's transformer/ folder of diffusion_pytorch_model shards"
)
_CONFIG_KEYS = ("img_in.weight", "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.img_mlp.w1.weight",
                "txt_norm.0.weight", "proj_out.weight", "time_text_embed.timestep_embedder.linear_1.weight")


def _key_prefix(ckpt: ShardSet) -> str:
    return find_key_prefix(ckpt, _PREFIXES, _MARKERS, "a Lens denoiser", _EXPECTED)


def check_file(path: str | os.PathLike) -> None:
    """Raise LensFileError unless `path` holds a Lens denoiser, from the file headers alone (no weights read)."""
    _key_prefix(open_component(path, "transformer", "diffusion_pytorch_model"))


def _size(ckpt: ShardSet, key: str, axis: int, what: str) -> int:
    """One dimension of a tensor that sizes the model: a tensor of the expected rank with that dimension above 0."""
    shape = ckpt.shape(key)
    if len(shape) <= axis or shape[axis] == 0:
        raise LensFileError(f"{ckpt.name}: {short(key)} has shape {list(shape)[:8]}, which cannot give the denoiser's {what}. "
                            "The file is damaged or not a Lens denoiser.")
    return shape[axis]


def config_from_checkpoint(ckpt: ShardSet, prefix: str = "") -> DiTConfig:
    """The DiT sizes implied by the tensor shapes (checked against each other at fill time)."""
    ckpt.require(prefix + key for key in _CONFIG_KEYS)
    block_ids = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d{1,9})\.", k))}
    text_ids = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(re.escape(prefix) + r"txt_norm\.(\d{1,9})\.weight$", k))}
    if block_ids != set(range(len(block_ids))):
        raise LensFileError(f"{ckpt.name}: the file numbers its transformer blocks up to {max(block_ids)}, but "
                            f"{missing_numbers(block_ids, max(block_ids) + 1)} are missing. "
                            "The file is incomplete or damaged: download it again.")
    hidden = _size(ckpt, prefix + "img_in.weight", 0, "width")
    head_dim = _size(ckpt, prefix + "transformer_blocks.0.attn.norm_q.weight", 0, "head size")
    if hidden % head_dim or head_dim % 2:
        raise LensFileError(f"{ckpt.name}: hidden size {hidden} is not a multiple of the head size {head_dim} (an even "
                            "number). The file is damaged or not a Lens denoiser.")
    return DiTConfig(
        hidden=hidden,
        heads=hidden // head_dim,
        head_dim=head_dim,
        blocks=len(block_ids),
        mlp_hidden=_size(ckpt, prefix + "transformer_blocks.0.img_mlp.w1.weight", 0, "MLP width"),
        text_width=_size(ckpt, prefix + "txt_norm.0.weight", 0, "text width"),
        text_layers=len(text_ids),
        in_channels=_size(ckpt, prefix + "img_in.weight", 1, "latent channels"),
        out_channels=_size(ckpt, prefix + "proj_out.weight", 0, "output channels"),
        time_channels=_size(ckpt, prefix + "time_text_embed.timestep_embedder.linear_1.weight", 1, "time channels"),
    )


def _check_config_json(ckpt: ShardSet, cfg: DiTConfig) -> None:
    """Microsoft's folder ships a config.json; contradictions with the shapes are caught here."""
    folder = Path(ckpt.name)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.exists():
        return
    declared = read_json_object(config_file, "config.json")
    checks = {"num_layers": cfg.blocks, "num_attention_heads": cfg.heads, "attention_head_dim": cfg.head_dim, "enc_hidden_dim": cfg.text_width}
    for field, actual in checks.items():
        if field in declared and declared[field] != actual:
            raise LensFileError(
                f"{config_file}: says {field} = {short(declared[field])}, but the weights beside it have {actual}. "
                "The folder mixes files of different models: download it again."
            )


def _linear(model: LensDiT, name: str, where: str) -> nn.Module:
    """The Linear layer `name` of the model, or a LensFileError saying the file packs a layer the model lacks."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not hasattr(module, "in_features"):
        raise LensFileError(f"{where}: the file packs a layer {short(name)}, which is not a Linear layer of the Lens "
                            "denoiser. The file is damaged or not a Lens denoiser.")
    return module


def _pack_marked_layers(model: LensDiT, ckpt: ShardSet, prefix: str) -> None:
    """Comfy-Org's quantised files mark each packed Linear with `{name}.comfy_quant` (a JSON object naming the format)."""
    for key in [k for k in ckpt.keys() if k.startswith(prefix) and k.endswith(".comfy_quant")]:
        name = key[len(prefix):-len(".comfy_quant")]
        marker = json_object(bytes(ckpt.read(key).to(torch.uint8).flatten().tolist()), f"{ckpt.name}: {short(key)}",
                             "quantisation marker")
        fmt = formats.COMFY_QUANT.get(marker.get("format")) if isinstance(marker.get("format"), str) else None
        if fmt is not formats.MXFP8_COMFY:
            raise LensFileError(f"{ckpt.name}: layer {short(name)} is quantised as {short(marker.get('format'))}; this pack "
                                "reads bf16, fp32, mxfp8 and GGUF Lens files. Use lens_bf16.safetensors or "
                                "lens_mxfp8.safetensors from Comfy-Org/Lens.")
        old = _linear(model, name, ckpt.name)
        if old.in_features % 32:
            raise LensFileError(f"{ckpt.name}: layer {short(name)} is mxfp8, whose blocks of 32 do not divide its "
                                f"{old.in_features} inputs. The file is damaged.")
        replace_module(model, name, PackedLinear(fmt, old.in_features, old.out_features, old.bias is not None, device="meta",
                                                 dtype=model.dtype))


def _pack_gguf_layers(model: LensDiT, ckpt: ShardSet, prefix: str) -> None:
    """The Linears whose weights a GGUF stores quantised stay packed (other quantised tensors are decoded at load)."""
    for name, module in list(model.named_modules()):
        key = prefix + name + ".weight"
        fmt = ckpt.packed_format(key) if key in ckpt and hasattr(module, "in_features") else None
        if fmt is None:
            continue
        if module.in_features % fmt.block.values:
            raise LensFileError(f"{ckpt.name}: {short(key)} is {fmt.name}, whose blocks do not divide its "
                                f"{module.in_features} inputs. The file is damaged or not a Lens denoiser.")
        replace_module(model, name, PackedLinear(fmt, module.in_features, module.out_features, module.bias is not None,
                                                 device="meta", dtype=model.dtype))


def fp8_layer_names(model: nn.Module) -> list[str]:
    """The denoiser's block Linears that fp8 weight storage packs (all but the modulation)."""
    return [name for name, module in model.named_modules()
            if name.startswith("transformer_blocks.") and hasattr(module, "in_features")
            and not any(part in name.split(".") for part in FP8_KEEP)
            and not (isinstance(module, PackedLinear) and isinstance(module.format, formats.GGUFBlocks))]


def to_fp8_weights(model: nn.Module, fast: bool) -> nn.Module:
    """Pack the block Linears (plain or mxfp8; GGUF ones stay as they are) as fp8 with one scale per row, in place,
    one layer at a time."""
    fmt = formats.fp8_rows(fast)
    for name in fp8_layer_names(model):
        old = model.get_submodule(name)
        weight = old.dequantized_weight(torch.float32, old.weight.device) if isinstance(old, PackedLinear) else old.weight
        new = PackedLinear(fmt, old.in_features, old.out_features, old.bias is not None, device=weight.device,
                           dtype=None if old.bias is None else old.bias.dtype)
        for part, value in fmt.quantize(weight).items():
            setattr(new, part, nn.Parameter(value, requires_grad=False))
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        replace_module(model, name, new)
    return model


def build_dit(path: str | os.PathLike, dtype: torch.dtype, text_mask: str = "every_block", operations=nn) -> tuple[LensDiT, ShardSet, str]:
    """The denoiser of the file at `path` on the meta device (its layers from `operations`, the file's packed layers as
    PackedLinear), with the file and its key prefix, ready to be filled."""
    ckpt = open_component(path, "transformer", "diffusion_pytorch_model")
    prefix = _key_prefix(ckpt)
    cfg = config_from_checkpoint(ckpt, prefix)
    _check_config_json(ckpt, cfg)
    with torch.device("meta"):
        model = LensDiT(cfg, text_mask=text_mask, operations=operations, dtype=dtype)
    _pack_marked_layers(model, ckpt, prefix)
    _pack_gguf_layers(model, ckpt, prefix)
    check_against_checkpoint(model, ckpt.keys(), lambda key, packed: (ckpt.stored_shape if packed else ckpt.shape)(key), ckpt.name, prefix)
    return model, ckpt, prefix


def load_dit(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             text_mask: str = "every_block", weight_dtype: str | None = None, compile: bool = False,
             attention: str = "sdpa", operations=nn) -> LensDiT:
    """Load a Lens denoiser from any published layout (see module docstring).

    device: default the best accelerator (CUDA, XPU, MPS), else CPU. dtype: the compute dtype, bfloat16 where
    the device computes it natively, float32 elsewhere; float16 is refused (the model overflows in fp16).
    text_mask: "every_block" (ComfyUI native, musubi-tuner; the default) or "first_block" (the diffusers
    port, which the golden tensors come from); see `LensDiT`.
    weight_dtype: None (weights in `dtype`), "fp8_e4m3fn" (block Linears packed as fp8 with per-row scales,
    0.67x the bytes, computed in `dtype`) or "fp8_e4m3fn_fast" (the same, multiplied fp8 x fp8 on GPUs with
    compute capability 8.9 and newer). Modulation and top-level layers keep `dtype` (see FP8_KEEP).
    compile: compile the blocks with torch.compile, at the first forward (see `LensDiT.compile_blocks`).
    attention: "sdpa" (default) or "sage" (SageAttention when installed; see `LensDiT.use_attention`).
    operations: the layer classes to build it from (torch.nn; ComfyUI passes its comfy.ops).
    """
    device, dtype = resolve_compute(device, dtype, what="the Lens denoiser")
    if weight_dtype not in (None, *FP8_WEIGHT_DTYPES):
        raise LensInputError(f"weight_dtype {weight_dtype!r} is not offered; use None (the compute dtype) or one of "
                             f"{', '.join(FP8_WEIGHT_DTYPES)}.")
    model, ckpt, prefix = build_dit(path, dtype, text_mask, operations)
    model.use_attention(attention)  # before reading 8 GB: a missing package is reported at once
    # fp8 layers are packed on the CPU, so the device never holds the full-precision weights.
    model = fill_from_checkpoint(model, ckpt.read, "cpu" if weight_dtype else device, dtype, prefix, file_name=ckpt.name)
    if weight_dtype:
        fast = weight_dtype.endswith("_fast")
        model = to_fp8_weights(model, fast)
        model.place(device)
        if fast and not formats.has_fp8_tensor_cores(device):
            log.info("Lens: %s has no fp8 tensor cores (NVIDIA compute capability 8.9+ has them): the weights stay fp8, "
                     "the matmuls run in %s", device, str(dtype).removeprefix("torch."))
    model.source = ckpt.name
    model.file_metadata = ckpt.metadata
    if compile:
        model.compile_blocks()
    return model
