"""`load_vae`: Comfy-Org's `flux2-vae.safetensors` (ldm names), BFL's `ae.safetensors` (ldm names,
quant convs possibly nested) and the diffusers `vae/` folder (`AutoencoderKLFlux2` names).

Every layout is renamed onto the ldm names of `FluxVAEModel` at this boundary.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..checkpoint.identify import describe, placement_hint
from ..checkpoint.source import ShardSet, open_component
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint
from ..device import resolve_compute
from ..errors import LensFileError
from .autoencoder import LensVAE
from .model import FluxVAEModel, VAEConfig

_EXPECTED = (
    "the FLUX.2 VAE with its BatchNorm statistics: Comfy-Org's flux2-vae.safetensors (models/vae), "
    "BFL's FLUX.2 ae.safetensors, or a diffusers vae/ folder"
)
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _diffusers_to_ldm(key: str, up_levels: int) -> str:
    key = re.sub(r"conv_norm_out\.", "norm_out.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    for old, new in _ATTN_PARTS.items():
        key = key.replace(f"mid_block.attentions.0.{old}.", f"mid.attn_1.{new}.")
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_levels - 1 - int(m.group(1))}.upsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_levels - 1 - int(m.group(1))}.block.", key)
    for old, new in _RESNET_PARTS.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _ldm_names(ckpt: ShardSet) -> dict[str, str]:
    """ldm name -> key in the file, for every tensor of the file."""
    keys = list(ckpt.keys())
    if any(".up_blocks." in k or ".down_blocks." in k for k in keys):
        up_levels = len({m.group(1) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
        return {_diffusers_to_ldm(k, up_levels): k for k in keys}
    names = {}
    for k in keys:
        name = k
        for prefix in ("first_stage_model.", "vae."):
            name = name.removeprefix(prefix)
        name = name.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv.")
        names[name] = k
    return names


def _config(names: dict[str, str], ckpt: ShardSet) -> VAEConfig:
    def shape(name):
        return ckpt.shape(names.get(name, name))

    channels = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n))})
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))}
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // channels for i in levels)
    return VAEConfig(channels=channels, channel_mult=mult, res_blocks=len(blocks),
                     z_channels=shape("decoder.conv_in.weight")[1], image_channels=shape("encoder.conv_in.weight")[1])


def _check_is_flux2_vae(names: dict[str, str], ckpt: ShardSet) -> None:
    required = ("encoder.conv_in.weight", "decoder.conv_in.weight", "bn.running_mean", "bn.running_var")
    if all(r in names for r in required):
        return
    looks_like = describe(names.keys(), lambda k: ckpt.shape(names[k]))
    if "FLUX.2 VAE" in looks_like:  # the right model with weights missing: say which
        ckpt.require(names.get(r, r) for r in required)
    hint = placement_hint(looks_like)
    if "FLUX.1 VAE" in looks_like:
        hint = " A FLUX.1 VAE (ae.safetensors of FLUX.1) is a common mix-up: Lens needs the FLUX.2 VAE (Comfy-Org flux2-vae.safetensors)."
    raise LensFileError(f"{ckpt.name}: this looks like {looks_like}, not the Lens VAE.{hint} Expected {_EXPECTED}.")


def check_file(path: str | os.PathLike) -> None:
    """Raise LensFileError unless `path` holds the FLUX.2 VAE, from the file headers alone (no weights read)."""
    ckpt = open_component(path, "vae", "diffusion_pytorch_model")
    _check_is_flux2_vae(_ldm_names(ckpt), ckpt)


def load_vae(path: str | os.PathLike, device=None, dtype=None, operations=nn) -> LensVAE:
    """Load the FLUX.2 VAE from any of its published layouts into a `LensVAE`.

    Defaults: CUDA when available (bf16), else CPU (fp32). `operations`: the layer classes (torch.nn; ComfyUI passes
    its comfy.ops).
    """
    device, dtype = resolve_compute(device, dtype, what="the Lens VAE")
    ckpt = open_component(path, "vae", "diffusion_pytorch_model")
    names = _ldm_names(ckpt)
    names.pop("bn.num_batches_tracked", None)
    _check_is_flux2_vae(names, ckpt)
    cfg = _config(names, ckpt)
    with torch.device("meta"):
        model = FluxVAEModel(cfg, operations, dtype=dtype)
    if ckpt.shape(names["bn.running_mean"]) != (4 * cfg.z_channels,):
        raise LensFileError(
            f"{ckpt.name}: the BatchNorm has {ckpt.shape(names['bn.running_mean'])} statistics but the latent has "
            f"{cfg.z_channels} channels (expected {4 * cfg.z_channels}). Expected {_EXPECTED}."
        )
    expected = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}

    def shape_of(name, packed):
        return expected[name] if ckpt.shape(names[name]) + (1, 1) == expected[name] else ckpt.shape(names[name])

    def read(name, dtype_):
        return ckpt.read(names[name], dtype_).reshape(expected[name])

    check_against_checkpoint(model, names.keys(), shape_of, ckpt.name)
    model = fill_from_checkpoint(model, read, device, dtype, dtype_for={"bn.running_mean": torch.float32, "bn.running_var": torch.float32},
                                 file_name=ckpt.name)
    return LensVAE(model, source=ckpt.name)
