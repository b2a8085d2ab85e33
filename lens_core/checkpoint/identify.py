"""Telling what kind of model a checkpoint holds from its key names, for loaders' error messages.

A user who puts a FLUX VAE in the Lens VAE slot should hear "this is a FLUX.1 VAE; Lens needs the
FLUX.2 VAE", not see a KeyError. Each rule looks at a few characteristic keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import LensFileError, some

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")


def _has(keys: set[str], name: str) -> bool:
    return any(p + name in keys for p in _PREFIXES)


def _vae_latent_channels(keys: set[str], shapes) -> int | None:
    for name in ("decoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight", "vae.decoder.conv_in.weight"):
        if name in keys:
            return shapes(name)[1]
    return None


def describe(keys: Iterable[str], shape=lambda key: ()) -> str:
    """A short phrase naming the model family of a checkpoint (e.g. "a FLUX.1 VAE (16 latent channels)")."""
    keys = set(keys)
    if _has(keys, "transformer_blocks.0.attn.norm_added_q.weight") and _has(keys, "transformer_blocks.0.img_mlp.w1.weight"):
        return "a Lens denoiser (DiT)"
    if _has(keys, "layers.0.self_attn.sinks") or "blk.0.attn_sinks.weight" in keys:
        return "a GPT-OSS language model (the Lens text encoder)"
    if "token_embd.weight" in keys:
        return "a llama.cpp language model GGUF of another family (not GPT-OSS)"
    if _has(keys, "layers.0.self_attn.q_proj.weight") or _has(keys, "embed_tokens.weight"):
        if _has(keys, "layers.0.self_attn.q_norm.weight"):
            return "a Qwen3-style language model (not GPT-OSS)"
        return "a language model of another family (Llama/Qwen/Mistral-style, not GPT-OSS)"
    if _has(keys, "double_blocks.0.img_attn.qkv.weight"):
        return "a FLUX-family diffusion model (FLUX.1/FLUX.2), not Lens"
    if _has(keys, "transformer_blocks.0.img_mod.1.weight") or _has(keys, "transformer_blocks.0.attn.add_q_proj.weight"):
        return "a Qwen-Image or diffusers MMDiT diffusion model, not Lens"
    if any(k.startswith(("model.diffusion_model.input_blocks.", "input_blocks.")) for k in keys):
        return "an SD1.x/SDXL UNet checkpoint"
    if any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("conditioner.") for k in keys):
        return "an SDXL checkpoint"
    if "decoder.conv_in.weight" in keys or "encoder.conv_in.weight" in keys:
        channels = _vae_latent_channels(keys, shape)
        has_bn = "bn.running_mean" in keys
        if has_bn:
            return f"a FLUX.2 VAE ({channels} latent channels, with BatchNorm)"
        if channels == 16:
            return "a FLUX.1 VAE (16 latent channels, no BatchNorm)"
        if channels == 4:
            return "an SD1.x/SDXL VAE (4 latent channels)"
        return f"a VAE without the FLUX.2 BatchNorm ({channels} latent channels)"
    if not keys:
        return "an empty file"
    return f"an unrecognised model (first keys: {some(sorted(keys)[:3])})"


_PLACES = (
    ("Lens denoiser", "the denoiser slot (ComfyUI/models/diffusion_models)"),
    ("GPT-OSS", "the text-encoder slot (ComfyUI/models/text_encoders)"),
    ("FLUX.2 VAE", "the VAE slot (ComfyUI/models/vae)"),
)


def find_key_prefix(ckpt, prefixes: tuple[str, ...], markers: tuple[str, ...], family: str, expected: str) -> str:
    """The key prefix under which `ckpt` holds every marker key of the model family, or a LensFileError saying what
    the file looks like instead (and where it belongs, when it is another part of Lens)."""
    for prefix in prefixes:
        if all(prefix + marker in ckpt for marker in markers):
            return prefix
    looks_like = describe(ckpt.keys(), ckpt.shape)
    raise LensFileError(f"{ckpt.name}: this looks like {looks_like}, not {family}.{placement_hint(looks_like)} Expected {expected}.")


def placement_hint(description: str) -> str:
    """" It belongs in ..." when the file is another Lens component put in the wrong place, else ""."""
    for marker, place in _PLACES:
        if marker in description:
            return f" That file is part of Lens: it belongs in {place}."
    return ""
