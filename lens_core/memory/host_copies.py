"""Whole-model moves between the GPU and page-locked CPU copies that the model keeps.

On GPUs too small for the text encoder and the denoiser together, the two take turns: every run copies ~11 GB of
encoder and ~8 GB of denoiser up, and back down when the other needs the room. From ordinary (pageable) memory
both directions crawl through a staging buffer, and each move down allocates the model's CPU memory anew.

Here a model's CPU copy becomes page-locked (pinned.py) the first time it leaves the GPU, and stays: moving the
model up copies from it at full PCIe speed without blocking, and moving it back down copies nothing at all, the
weights just point at their CPU copies again. The price: while the model is on the GPU its CPU copy stays in RAM
(a model that never leaves the GPU never gets one). Within the page-locked budget only; past it, weights move
as before. Callers that know a model will come back down (the nodes' move-while-used policy) ask for the copy
on the way up (`keep_host_copy`), so that the very first move down is free too.

Weights are read-only on the GPU (true of every Lens model: LoRAs are a side path, casts happen at load). A
weight that something else replaces on the GPU is copied down as usual; its old GPU copy stays referenced here.
"""

from __future__ import annotations

import torch
from torch import nn

from . import pinned
from .pinned import PinnedGroup

CHUNK_BYTES = 256 << 20  # CPU copies are page-locked in groups of about this size: few driver calls, little waste


def _key(tensor: torch.Tensor) -> tuple:
    """Which memory a tensor reads, and how. Its storage object identifies the memory (unlike a data pointer, which
    every meta tensor shares); live tensors with equal keys hold the same data."""
    return tensor.untyped_storage()._cdata, tensor.storage_offset(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def chunks(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` in order, in groups of at most CHUNK_BYTES (or a single larger tensor)."""
    groups, size = [], 0
    for tensor in tensors:
        nbytes = pinned.packed_bytes([tensor])
        if not groups or size + nbytes > CHUNK_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    return groups


class HostCopies:
    """The page-locked CPU copies ("homes") of one model's weights, and which GPU tensors were copied from which."""

    def __init__(self):
        self._groups: list[PinnedGroup] = []  # held, so that their memory stays page-locked
        self._homes: dict[tuple, torch.Tensor] = {}  # key of a home -> the home
        # key of a copy made from a home -> (the copy, held so that its memory cannot be reused, the home)
        self._away: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        """Page-locked bytes these copies hold."""
        return sum(group.buffer.numel() for group in self._groups)

    def is_home(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and _key(tensor) in self._homes

    def adopt(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Page-locked CPU copies of `tensors` (from any device), kept as their homes; None where the budget or the
        driver says no."""
        group = PinnedGroup(tensors) if pinned.can_pin(pinned.packed_bytes(tensors)) else None
        if group is None or not group.pinned:
            return None
        self._groups.append(group)
        self._homes.update((_key(home), home) for home in group.tensors)
        return group.tensors

    def moved(self, tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
        """`tensors` on `device`. Up: copied from their homes where they are homes (without blocking). Down: their
        homes where they were copied from one; otherwise new homes (while the budget lasts), or plain copies."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._down(tensors)
        result = []
        for tensor in tensors:
            home = self._home_of(tensor)
            copy = tensor.to(device, non_blocking=True)
            if home is not None:
                self._away[_key(copy)] = (copy, home)
            result.append(copy)
        return result

    def _home_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The home a tensor is, or that it was copied from (that record is taken: the copy is leaving)."""
        if tensor.device.type == "cpu":
            return self._homes.get(_key(tensor))
        record = self._away.pop(_key(tensor), None)
        return None if record is None else record[1]

    def _down(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        result = [tensor if tensor.device.type == "cpu" else self._home_of(tensor) for tensor in tensors]
        missing = [i for i, found in enumerate(result) if found is None]
        places, adopting = iter(missing), True
        for group in chunks([tensors[i] for i in missing]):
            homes = self.adopt(group) if adopting else None
            adopting = homes is not None  # once the budget or the driver says no, the rest are plain copies
            for copy in homes or [tensor.to("cpu") for tensor in group]:
                result[next(places)] = copy
        return result


def host_copies_of(module: nn.Module) -> HostCopies:
    """A model's host copies; a denoiser with LoRAs uses those of the model whose weights it shares."""
    owner = getattr(module, "base_model", module)
    if "_host_copies" not in owner.__dict__:
        owner.__dict__["_host_copies"] = HostCopies()  # a plain attribute, not a submodule
    return owner.__dict__["_host_copies"]


def _moving_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What `module.to(...)` would move, each once, as its `_apply` hands them over (the model's own rules
    included: blocks a block swap keeps on the CPU, the token embedding)."""
    found = {}
    module._apply(lambda tensor: found.setdefault(id(tensor), tensor))
    return list(found.values())


def _replace(module: nn.Module, old: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    replacement = {id(a): b for a, b in zip(old, new)}
    module._apply(lambda tensor: replacement.get(id(tensor), tensor))


def pin_in_place(module: nn.Module, copies: HostCopies | None = None) -> None:
    """Give a module's CPU weights page-locked homes now, a chunk at a time (each chunk's old memory is freed
    before the next is copied, so RAM grows by one chunk at most), until the budget runs out. `copies`: those of
    the model the module belongs to (default: the module's own)."""
    copies = copies or host_copies_of(module)
    pending = chunks([t for t in _moving_tensors(module) if t.device.type == "cpu" and not copies.is_home(t)])
    while pending:
        group = pending.pop(0)
        homes = copies.adopt(group)
        if homes is None:
            return
        _replace(module, group, homes)


def move_module(module: nn.Module, device, keep_host_copy: bool = False, copies: HostCopies | None = None) -> None:
    """Move what `module.to(device)` would move through the model's host copies (see the module docstring).
    `copies`: those of the model the module belongs to (default: the module's own)."""
    copies = copies or host_copies_of(module)
    if keep_host_copy and torch.device(device).type != "cpu":
        pin_in_place(module, copies)
    tensors = _moving_tensors(module)
    _replace(module, tensors, copies.moved(tensors, device))
