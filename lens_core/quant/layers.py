"""The packed layers: one Linear and one expert bank, each parameterised by a format of formats.py.

Both keep their weights packed wherever they live and decode on the device of the input, in its dtype, at every
use. A layer whose weights sit in CPU memory therefore still computes on the GPU: only its packed bytes travel. That
is what lets ComfyUI leave such layers in CPU memory when a model does not fit the GPU (its "partial loading"), and
what the attributes below tell ComfyUI's model patcher (plain attributes; nothing here imports ComfyUI):
- `comfy_cast_weights`: the layer brings its own weights to the compute device;
- `weight_function` / `bias_function`: functions ComfyUI hands the layer to apply to the decoded weight and bias,
  and `weight_lowvram_function`, ComfyUI's weight patch (a LoRA) for the layer: applied after decoding, on the
  compute device, in the compute dtype;
- `convert_weight` / `set_weight`: what ComfyUI calls to merge a patch into a weight it loads whole. A packed weight
  cannot take a merged weight back without re-quantising it (lossy, or impossible for llama.cpp's K types), so it
  keeps its packed weight and the patch is applied after decoding instead (nodes/comfy_models.py attaches it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import PackedFormat


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted path `name` of `root`; returns what was there."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = parent.get_submodule(leaf)
    setattr(parent, leaf, new)
    return old


def _patched(tensor: torch.Tensor, lowvram_function, functions) -> torch.Tensor:
    if lowvram_function is not None:
        tensor = lowvram_function(tensor)
    for function in functions:
        tensor = function(tensor)
    return tensor


class PackedLayer(nn.Module):
    """Parts of a format as parameters (never trained; integers, so model casts leave them alone)."""

    comfy_cast_weights = True
    weight_function: list = []
    bias_function: list = []
    weight_lowvram_function = None

    def _register_parts(self, fmt: PackedFormat, rows: int, cols: int, leading: tuple[int, ...], device) -> None:
        self.format = fmt
        self.part_names = tuple(fmt.shapes(rows, cols))
        for name, (shape, storage) in fmt.shapes(rows, cols).items():
            tensor = torch.empty(*leading, *shape, dtype=storage, device=device)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def parts(self, device, index: int | None = None) -> dict[str, torch.Tensor]:
        """The packed parts (of expert `index`, for a bank) on `device`: only these bytes travel."""
        return {name: (getattr(self, name) if index is None else getattr(self, name)[index]).to(device, non_blocking=True)
                for name in self.part_names}

    def packed_finite(self) -> bool:
        """Whether every value is finite, judged from the packed bytes (format.finite: no decode)."""
        return self.format.finite(self.parts(self.weight.device))

    def extra_repr(self) -> str:
        return f"format={self.format.name}"


class PackedLinear(PackedLayer):
    """A Linear whose weight stays packed and is decoded in every forward."""

    def __init__(self, fmt: PackedFormat, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._register_parts(fmt, out_features, in_features, (), device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The weight decoded in `dtype` on `device` (default: where it is), with ComfyUI's patches applied."""
        weight = self.format.decode(self.parts(device or self.weight.device), self.out_features, self.in_features, dtype)
        return _patched(weight, self.weight_lowvram_function, self.weight_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.bias is not None:
            bias = _patched(self.bias.to(x.device, x.dtype, non_blocking=True), None, self.bias_function)
        if self.weight_lowvram_function is None and not self.weight_function:
            fused = self.format.linear(x, self.parts(x.device), bias)
            if fused is not None:
                return fused
        return F.linear(x, self.dequantized_weight(x.dtype, x.device), bias)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """ComfyUI's full-load patching hands the packed weight cast to a float dtype (its byte values, exactly):
        the decoded weight, for the patch to be computed on."""
        parts = self.parts(weight.device)
        parts["weight"] = weight.to(self.weight.dtype)
        return self.format.decode(parts, self.out_features, self.in_features, torch.float32)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False):
        """The packed weight stays as it is (see the module docstring); the patch applies after decoding."""
        return weight if return_weight else None


class PackedBank(PackedLayer):
    """The experts' matrices of one MoE projection, [experts, out, in] packed, with their biases [experts, out];
    `expert_weight(e)` decodes one expert's matrix on the device that asks (only that expert's bytes travel)."""

    def __init__(self, fmt: PackedFormat, experts: int, out_features: int, in_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = experts, out_features, in_features
        self._register_parts(fmt, out_features, in_features, (experts,), device)
        self.bias = (nn.Parameter(torch.empty(experts, out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def expert_weight(self, expert: int, dtype: torch.dtype, device) -> torch.Tensor:
        return self.format.decode(self.parts(device, expert), self.out_features, self.in_features, dtype)

    def expert_bias(self, expert: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[expert].to(device, dtype, non_blocking=True)
