"""Moving a model between the GPU and page-locked CPU copies of its weights, one way for every Lens model.

On GPUs too small for the text encoder and the denoiser together, the two take turns: every run copies ~11 GB of
encoder and ~8 GB of denoiser up, and back down when the other needs the room. From ordinary (pageable) memory
both directions crawl through a staging buffer, and each move down allocates the model's CPU memory anew.

Here a weight's CPU copy is page-locked (pinned.py) and kept with the weight itself (the tensor attribute
`lens_host_copy`), so the copy lives exactly as long as the weight: a dropped LoRA or a collected model frees its
copies, and a LoRA's copies are its own. Moving up copies from it at full PCIe speed without blocking; moving back
down copies nothing, the weight points at its CPU copy again. The price: while the model is on the GPU its CPU
copy stays in RAM. Within the page-locked budget only; past it, weights move as ordinary copies.

`move_model` is the only mover the pack uses, and a plain `model.to(...)` stays safe: nothing here holds a GPU
tensor, so whatever moves a model off the GPU frees its GPU memory. What a model keeps in CPU memory wherever it
computes (its `cpu_resident()`: blocks a block swap streams, the text encoder's token embedding and streamed
expert banks) is left there by `move_model`; a plain `.to()` moves it too (more GPU memory, the same results).

Weights are read-only once loaded (true of every Lens model: LoRAs are a side path, casts happen at load); a
copy whose shape or dtype no longer matches its weight (after a cast) is replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.tensor_loading import place_tensor
from . import pinned

CPU = torch.device("cpu")


def named_weights(module: nn.Module):
    """(name, tensor) of every parameter and buffer, each once."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def cpu_resident(module: nn.Module) -> dict[str, bool]:
    """The model's name prefixes that stay in CPU memory -> whether they stream to the compute device."""
    resident = getattr(module, "cpu_resident", None)
    return resident() if resident is not None else {}


def host_copy(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's page-locked CPU copy, where it has a current one."""
    copy = getattr(tensor, "lens_host_copy", None)
    return copy if copy is not None and copy.shape == tensor.shape and copy.dtype == tensor.dtype else None


def pin(tensor: torch.Tensor, pool: pinned.Pool) -> bool:
    """Give `tensor` a page-locked CPU copy from `pool` (a CPU tensor then uses it as its memory); False past the
    budget."""
    copy = host_copy(tensor)
    if copy is None:
        copy = pool.empty_like(tensor)
        if copy is None:
            return False
        copy.copy_(tensor)
        tensor.lens_host_copy = copy
    if tensor.device.type == "cpu":
        tensor.data = copy
    return True


def _put(module: nn.Module, name: str, tensor: torch.Tensor, new: torch.Tensor) -> None:
    """Make the weight `name` hold `new`: in place (`.data`, as `nn.Module.to` does), so that every module sharing
    the weight sees it; where the two tensor kinds cannot share an object (the meta device), by a new tensor in its
    module, which keeps the page-locked copy."""
    try:
        tensor.data = new
        return
    except RuntimeError:
        pass
    placed = place_tensor(module, name, new)
    if hasattr(tensor, "lens_host_copy"):
        placed.lens_host_copy = tensor.lens_host_copy


def move_model(module: nn.Module, device, keep_host_copy: bool = False) -> None:
    """Put `module`'s weights on `device`, less what it keeps in CPU memory (page-locked where it streams).

    Down: a weight points at its page-locked copy (no copy), or gets one while the budget lasts. Up: copied from
    it without blocking. `keep_host_copy`: the model will come back down, so weights on the CPU get their
    page-locked copies before they go up (the first move down is then free too).
    """
    device = torch.device(device)
    resident = cpu_resident(module)
    stays = tuple(resident)
    streams = tuple(prefix for prefix, streamed in resident.items() if streamed)
    plan = []  # (name, tensor, where it goes, whether it gets a page-locked copy)
    for name, tensor in named_weights(module):
        target = CPU if device.type == "cpu" or name.startswith(stays) else device
        to_pin = host_copy(tensor) is None and (
            (target.type == "cpu" and tensor.device.type != "cpu")  # down: into page-locked memory
            or (target.type == "cpu" and device.type != "cpu" and name.startswith(streams))  # streamed from there
            or (keep_host_copy and target.type != "cpu" and tensor.device.type == "cpu"))  # it will come back
        plan.append((name, tensor, target, to_pin))
    pool = pinned.Pool([tensor for _, tensor, _, to_pin in plan if to_pin])
    for name, tensor, target, to_pin in plan:
        if to_pin:
            pin(tensor, pool)
        if target.type == "cpu" and tensor.device.type != "cpu":
            copy = host_copy(tensor)
            _put(module, name, tensor, copy if copy is not None else tensor.to(CPU))
        elif target.type != "cpu" and tensor.device != target:
            _put(module, name, tensor, tensor.to(target, non_blocking=True))
