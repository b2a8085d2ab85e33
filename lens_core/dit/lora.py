"""LoRAs for the Lens denoiser: the published file formats, and a denoiser that computes with them.

Formats (one file may use any of the key spellings; prefixes are stripped, then the module path must name
one of the denoiser's Linear layers, e.g. `transformer_blocks.3.attn.img_qkv` or `img_mod.1`):
- musubi-tuner / kohya: `lora_unet_<module path with "_" for ".">.lora_down.weight` / `.lora_up.weight` / `.alpha`
- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (`base_model.model.` prefixes too)
- ComfyUI: `diffusion_model.<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`
Scale: alpha / rank where the file gives alpha, 1 otherwise.

How the LoRAs are applied: as a low-rank side path, y = base(x) + sum_i strength_i * scale_i * up_i(down_i(x)),
in a shallow copy of the denoiser that shares every base weight. Merging would need a writable copy of
every patched layer (up to the whole 8 GB for a LoRA on all layers) and cannot touch fp8 / mxfp8 weights
without losing precision; the side path costs rank/in_features of the layer's FLOPs (about 1-4 %) and no copy.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.files import short
from ..checkpoint.identify import describe, placement_hint
from ..checkpoint.safetensors_reader import SafetensorsFile
from ..errors import LensFileError, LensInputError, some

log = logging.getLogger("lens_core")

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "model.")
_KOHYA_PREFIX = "lora_unet_"
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".alpha": "alpha",
}
_OTHER_MODELS = (  # (what a file looks like, a key pattern only that model family has)
    ("an SDXL / SD1.5 LoRA", re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|lora_te\d?_)")),
    ("a FLUX LoRA", re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)")),
    ("a Qwen-Image LoRA", re.compile(r"(add_q_proj|add_k_proj|attn[._]to_q\b|img_mlp[._]net)")),
    ("a Wan / video-model LoRA", re.compile(r"(self_attn[._]q|cross_attn)")),
)


@dataclass
class LoRALayer:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor    # [out, rank]
    scale: float        # alpha / rank, or 1


@dataclass
class LoRA:
    """A LoRA file read and mapped onto the denoiser's Linear layers by module name; `format` names the key spelling
    (musubi-tuner / kohya, diffusers / PEFT, or ComfyUI)."""

    layers: dict[str, LoRALayer]
    source: str
    unmatched: list[str]
    format: str = ""


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def linear_names(dit: nn.Module) -> dict[str, nn.Module]:
    """The denoiser's Linear layers (plain, quantised or already LoRA-wrapped) by module path."""
    wrapped = {name + ".base" for name, module in dit.named_modules() if isinstance(module, LoRALinear)}
    return {name: module for name, module in dit.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features") and name not in wrapped}


def _what_it_looks_like(keys: list[str]) -> str:
    for label, pattern in _OTHER_MODELS:
        if any(pattern.search(k) for k in keys):
            return label
    return "a LoRA for another model"


def load_lora(path, dit: nn.Module) -> LoRA:
    """Read a LoRA file in any of the three formats and map it onto `dit`'s Linear layers.

    Raises LensFileError when nothing matches (naming what the file looks like) or when a layer's shapes
    do not fit; a partly matching file loads with a warning listing the first unmatched keys.
    """
    path = Path(path)
    targets = linear_names(dit)
    kohya_targets = {name.replace(".", "_"): name for name in targets}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unmatched, spellings = [], set()
    file = SafetensorsFile(path)
    keys = list(file.keys())
    for key in keys:
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        module, part = split
        spellings.add("musubi-tuner / kohya" if module.startswith(_KOHYA_PREFIX) else
                      "diffusers / PEFT" if ".lora_A." in key or ".lora_B." in key else "ComfyUI")
        if module.startswith(_KOHYA_PREFIX):
            name = kohya_targets.get(module[len(_KOHYA_PREFIX):])
        else:
            name = _strip_prefixes(module)
            name = name if name in targets else None
        if name is None:
            unmatched.append(key)
            continue
        parts.setdefault(name, {})[part] = file.read(key)
    if not any(_split_key(key) for key in keys):
        looks_like = describe(keys, lambda key: file.tensors[key].shape)
        raise LensFileError(f"{path}: this is not a LoRA file (no lora_down / lora_A weights): it looks like "
                            f"{looks_like}.{placement_hint(looks_like)}")
    if not parts:
        raise LensFileError(
            f"{path.name} matched none of the Lens denoiser's layers ({len(keys)} keys, 0 matched): it looks like "
            f"{_what_it_looks_like(keys)}. Lens LoRAs name layers such as transformer_blocks.0.attn.img_qkv "
            "(musubi-tuner, diffusers / PEFT or ComfyUI format)."
        )
    layers = {name: _layer(path.name, name, tensors, targets[name]) for name, tensors in sorted(parts.items())}
    if unmatched:
        log.warning("Lens LoRA %s: %d of %d keys match no Lens layer and are ignored, e.g. %s", path.name, len(unmatched),
                    len(keys), some(unmatched))
    return LoRA(layers, str(path), unmatched, " + ".join(sorted(spellings)))


def _matrix(tensor: torch.Tensor, file_name: str, name: str, which: str) -> torch.Tensor:
    """A LoRA factor as a matrix: [rows, cols], or the same as a 1x1 convolution; at least one row and column."""
    if tensor.ndim not in (2, 4) or (tensor.ndim == 4 and tuple(tensor.shape[2:]) != (1, 1)) or 0 in tensor.shape:
        raise LensFileError(f"{file_name}: layer {short(name)} has a {which} factor of shape {list(tensor.shape)[:8]}; a LoRA "
                            "factor is a matrix [rank, in] or [out, rank] with rank >= 1. The file is damaged.")
    return tensor.reshape(tensor.shape[0], -1)


def _layer(file_name: str, name: str, tensors: dict[str, torch.Tensor], target: nn.Module) -> LoRALayer:
    if "down" not in tensors or "up" not in tensors:
        raise LensFileError(f"{file_name}: layer {short(name)} has only its {', '.join(sorted(tensors))} weight(s); a LoRA layer "
                            "needs both down (lora_down / lora_A) and up (lora_up / lora_B).")
    down, up = _matrix(tensors["down"], file_name, name, "down"), _matrix(tensors["up"], file_name, name, "up")
    rank = down.shape[0]
    if down.shape[1] != target.in_features or up.shape != (target.out_features, rank):
        raise LensFileError(
            f"{file_name}: layer {name} does not fit: the LoRA has down {list(down.shape)} and up {list(up.shape)}, the Lens layer "
            f"maps {target.in_features} -> {target.out_features} features (down must be [rank, {target.in_features}], "
            f"up [{target.out_features}, rank]). Is this LoRA for another model size?"
        )
    scale = 1.0
    if "alpha" in tensors:
        alpha = tensors["alpha"]
        if alpha.numel() != 1 or alpha.dtype == torch.bool or not math.isfinite(float(alpha.float().item())):
            raise LensFileError(f"{file_name}: layer {short(name)} has an alpha of shape {list(alpha.shape)[:8]}; alpha is one "
                                "finite number. The file is damaged.")
        scale = float(alpha.float().item()) / rank
    return LoRALayer(down.float(), up.float(), scale)


class LoRALinear(nn.Module):
    """A Linear layer (plain, fp8 or mxfp8) plus low-rank side paths; the base layer is shared, not copied."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.downs = nn.ParameterList()
        self.ups = nn.ParameterList()
        self.param_dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that asks a Linear for its weight (dtype, device) still works."""
        return self.base.weight

    def add(self, layer: LoRALayer, strength: float, device) -> None:
        """Fold strength and scale into the up matrix once, so the forward pays two small matmuls per LoRA."""
        self.downs.append(nn.Parameter(layer.down.to(device, self.param_dtype), requires_grad=False))
        self.ups.append(nn.Parameter((layer.up * (strength * layer.scale)).to(device, self.param_dtype), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for down, up in zip(self.downs, self.ups):
            out = out + (x.to(down.dtype) @ down.T @ up.T).to(out.dtype)
        return out


def _unshare(module: nn.Module) -> nn.Module:
    """A shallow copy whose tables of children, parameters and buffers can be changed without touching the
    original's (the parameter and buffer tensors themselves stay shared: the same weights, wherever they are).

    A compiled module's compiled call is bound to the original; the copy drops it (apply_loras compiles anew)."""
    clone = copy.copy(module)
    clone._modules, clone._parameters, clone._buffers = dict(module._modules), dict(module._parameters), dict(module._buffers)
    clone.__dict__.pop("_compiled_call_impl", None)
    return clone


def apply_loras(dit: nn.Module, loras: list[tuple]) -> nn.Module:
    """A denoiser that computes with `loras` [(path or LoRA, strength), ...] on top of `dit`.

    The result shares every base weight with `dit` (no second copy) and `dit` itself is left as it was;
    applying to a denoiser that already has LoRAs stacks the new ones. Strength 0 entries are skipped.
    """
    result = _unshare(dit)
    # Whose weights this one shares (memory is counted there); set in __dict__ so it is not registered as a submodule.
    result.__dict__["base_model"] = getattr(dit, "base_model", dit)
    dtype = torch.float32 if dit.dtype == torch.float32 else torch.bfloat16
    for source, strength in loras:
        if not math.isfinite(strength):
            raise LensInputError(f"LoRA strength {strength} is not a finite number; use e.g. 1.0 (0 turns the LoRA off).")
        if strength == 0:
            continue
        lora = source if isinstance(source, LoRA) else load_lora(source, dit)
        for name, layer in lora.layers.items():
            result = _patched(result, name, layer, float(strength), dtype)
    if getattr(dit, "compiled", False):
        result.compile_blocks()
    return result


def _patched(root: nn.Module, name: str, layer: LoRALayer, strength: float, dtype: torch.dtype) -> nn.Module:
    """Wrap the Linear at `name` (copying only the modules on the path to it) and add one LoRA to it."""
    *path, leaf = name.split(".")
    parent = root
    for part in path:
        child = _unshare(parent._modules[part])
        parent._modules[part] = child
        parent = child
    current = parent._modules[leaf]
    if isinstance(current, LoRALinear):
        wrapper = LoRALinear(current.base, current.param_dtype)  # a new wrapper: the old one still serves its own model
        wrapper.downs.extend(current.downs)
        wrapper.ups.extend(current.ups)
    else:
        wrapper = LoRALinear(current, dtype)
    wrapper.add(layer, strength, current.weight.device)
    parent._modules[leaf] = wrapper
    return root
