"""Page-locked ("pinned") CPU memory for weights that travel to the GPU, handed out from fixed-size slabs.

Copies from page-locked memory run at full PCIe speed and asynchronously (overlapping compute); copies from
ordinary memory go through a staging buffer at a fraction of that and block. The pack page-locks the CPU copies
of what streams to the GPU during a forward (swapped denoiser blocks, streamed expert banks) and of whole models
that take turns on the GPU (host_copies.py).

Where the memory comes from (`provider`): outside ComfyUI, PyTorch's page-locked allocator within the pack's
budget (`TorchPinnedMemory`); inside a ComfyUI that page-locks weights itself, ComfyUI's own `pin_memory` /
`unpin_memory` and budget (nodes/comfy_bridge.py installs it), so --disable-pinned-memory and ComfyUI's limit
apply to the pack too. Past the budget, weights stay in ordinary memory: the same results, slower copies.

PyTorch's allocator rounds every allocation up to a power of two (a swapped bf16 block's 170 MB of tensors would
take 218 MB one by one), so copies are packed into slabs of SLAB_BYTES, a power of two; a slab goes back to the
provider when the last copy in it is gone (each copy holds its slab).
"""

from __future__ import annotations

import logging
import os
import platform
import weakref

import torch
from torch import nn

log = logging.getLogger("lens_core")

SLAB_BYTES = 256 << 20
ALIGNMENT = 512  # each copy starts on such a boundary within its slab: aligned for every dtype and for DMA
GB = 1 << 30


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _total_ram() -> int:
    """Physical memory in bytes; 0 where it cannot be read (then nothing is page-locked)."""
    try:
        import psutil  # ComfyUI installs it; the only way on Windows
        return psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def default_limit(total_ram: int, windows: bool) -> int:
    """ComfyUI's rule for its own page-locked budget (comfy/model_management.py), so both agree on what is safe:
    page-locked memory cannot be swapped out (Windows refuses beyond about half of the RAM)."""
    if windows:
        return int(total_ram * 0.40)
    return int(max(total_ram * 0.40, min(total_ram * 0.90, total_ram - 4 * GB)))


def limit_for_this_machine() -> int:
    """$LENS_PINNED_MEMORY_GB, else `default_limit` of this machine's RAM."""
    override = os.environ.get("LENS_PINNED_MEMORY_GB")
    if override:
        try:
            return int(float(override) * GB)
        except ValueError:
            log.warning("Lens: LENS_PINNED_MEMORY_GB=%r is not a number of gigabytes (e.g. 16, or 0 for none); "
                        "using the default page-locked memory budget", override)
    return default_limit(_total_ram(), platform.system() == "Windows")


class TorchPinnedMemory:
    """PyTorch's page-locked allocator, within a budget (outside ComfyUI). A freed slab returns to PyTorch's
    cache of page-locked memory, where the next slab (of the same size) reuses it."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def allocate(self, nbytes: int) -> torch.Tensor | None:
        if not torch.cuda.is_available() or self.used + nbytes > self.limit:
            return None
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # the driver refused
            return None
        self.used += nbytes
        return buffer

    def free(self, buffer: torch.Tensor) -> None:
        self.used -= buffer.numel()


class ComfyUIPinnedMemory:
    """ComfyUI's page-locking (`comfy.model_management.pin_memory` / `unpin_memory`), which registers an ordinary
    CPU tensor in place, within ComfyUI's budget and running total. It page-locks only parameter-typed tensors,
    so a slab is handed over as an `nn.Parameter`."""

    def __init__(self, management):
        self.management = management

    def allocate(self, nbytes: int) -> torch.Tensor | None:
        buffer = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8), requires_grad=False)
        return buffer if self.management.pin_memory(buffer) else None

    def free(self, buffer: torch.Tensor) -> None:
        if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():  # (a CUDA graph capture forbids it)
            torch.cuda.synchronize()  # no copy from it may still be running once it is unregistered
        self.management.unpin_memory(buffer)


provider = TorchPinnedMemory(limit_for_this_machine())


class Slab:
    """One page-locked buffer, handed out front to back; given back to its provider when the Slab is collected.
    Every copy made from it holds it (`tensor.lens_slab`), so that happens when the last copy is gone."""

    def __init__(self, buffer: torch.Tensor, source):
        self.buffer, self.used = buffer, 0
        release = weakref.finalize(self, source.free, buffer)
        release.atexit = False  # at exit the process frees everything; CUDA may already be shut down

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 view of `nbytes` from the unused rest, or None where it does not fit."""
        if self.used + nbytes > self.buffer.numel():
            return None
        view = self.buffer.detach()[self.used:self.used + nbytes]
        self.used += _aligned(nbytes)
        return view


_refusal_logged = False


def _log_refusal(nbytes: int) -> None:
    global _refusal_logged
    if not _refusal_logged:
        _refusal_logged = True
        log.warning("Lens: no more page-locked memory for weights (%.2f GB more asked for: the budget is used up or the "
                    "driver refused); they stay in ordinary memory from here on: outputs are the same, their copies to "
                    "the GPU are slower. Set LENS_PINNED_MEMORY_GB (or ComfyUI's pinned-memory options) to change the "
                    "budget.", nbytes / 1e9)


def footprint(tensor: torch.Tensor) -> int:
    """The bytes a page-locked copy of `tensor` takes in a slab."""
    return _aligned(tensor.numel() * tensor.element_size())


class Pool:
    """Page-locked copies for one batch of tensors (one move of a model), cut from slabs of at most SLAB_BYTES,
    each no larger than what the batch still needs: one model's copies share no slab with another's (a dropped
    LoRA frees its slabs) and a small batch takes a small slab."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.remaining = sum(map(footprint, tensors))
        self.slab: Slab | None = None
        self.refused = False

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A page-locked CPU tensor of `tensor`'s shape and dtype (contents undefined), or None past the budget."""
        nbytes = tensor.numel() * tensor.element_size()
        bytes_ = self.slab.take(nbytes) if self.slab is not None else None
        if bytes_ is None:
            if self.refused:
                return None
            buffer = provider.allocate(max(min(SLAB_BYTES, self.remaining), footprint(tensor)))
            if buffer is None:
                self.refused = True  # the rest of the batch stays in ordinary memory
                if torch.cuda.is_available():
                    _log_refusal(nbytes)
                return None
            self.slab = Slab(buffer, provider)
            bytes_ = self.slab.take(nbytes)
        self.remaining -= footprint(tensor)
        view = bytes_.view(tensor.dtype).view(tensor.shape)
        view.lens_slab = self.slab
        return view
