"""Page-locked ("pinned") CPU copies of weights that travel to the GPU, at their exact size, within a budget.

Copies from page-locked memory run at full PCIe speed and asynchronously (overlapping compute); copies from
ordinary memory go through a staging buffer at a fraction of that and block. The pack page-locks what streams
to the GPU during a forward (swapped denoiser blocks, streamed expert banks) and the CPU copies that whole models
keep while they take turns on the GPU (host_copies.py).

`Tensor.pin_memory()` allocates through PyTorch's caching host allocator, which rounds every allocation up to a
power of two: a swapped bf16 block's 170 MB of tensors take 218 MB that way (1.28x; 24 swapped blocks: 5.24 GB
instead of 4.08). Instead, a `PinnedGroup` packs its tensors into one ordinary CPU buffer that CUDA page-locks in
place (`cudaHostRegister`): exactly their bytes (plus < 4 KB per tensor, and per group, of alignment), released
(unregistered, then freed) with the group.

Page-locked memory cannot be swapped out, so the operating system must keep that much RAM back (Windows refuses
beyond about half of it). Every group asks `ledger` first: outside ComfyUI a budget of the machine's RAM sized as
ComfyUI sizes its own (40 % on Windows; elsewhere 90 %, but leaving 4 GB, and at least 40 %), or
$LENS_PINNED_MEMORY_GB; inside a ComfyUI that page-locks weights itself, its budget and running total, shared
(nodes/comfy_bridge.py). Past the budget, weights stay in ordinary memory: the same results, slower copies.
"""

from __future__ import annotations

import logging
import os
import platform
import weakref

import torch

log = logging.getLogger("lens_core")

ALIGNMENT = 4096  # each tensor starts on a page boundary: aligned for every dtype and for DMA
GB = 1 << 30


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def packed_bytes(tensors) -> int:
    """The buffer a PinnedGroup of `tensors` takes."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors)


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
    """ComfyUI's rule for its own page-locked budget (comfy/model_management.py), so both agree on what is safe."""
    if windows:
        return int(total_ram * 0.40)
    return int(max(total_ram * 0.40, min(total_ram * 0.90, total_ram - 4 * GB)))


class Ledger:
    """The pack's own page-locked budget (outside ComfyUI): a limit and a running total."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @classmethod
    def for_this_machine(cls) -> "Ledger":
        override = os.environ.get("LENS_PINNED_MEMORY_GB")
        if override:
            try:
                return cls(int(float(override) * GB))
            except ValueError:
                log.warning("Lens: LENS_PINNED_MEMORY_GB=%r is not a number of gigabytes (e.g. 16, or 0 for none); "
                            "using the default page-locked memory budget", override)
        return cls(default_limit(_total_ram(), platform.system() == "Windows"))

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


ledger = Ledger.for_this_machine()


def can_pin(nbytes: int) -> bool:
    """Whether `nbytes` more could be page-locked now: CUDA is there and the budget has room (reserves nothing)."""
    if not torch.cuda.is_available() or not ledger.reserve(nbytes):
        return False
    ledger.release(nbytes)
    return True


def _whole_pages(nbytes: int) -> torch.Tensor:
    """A CPU byte buffer of `nbytes` (a multiple of ALIGNMENT) that starts on a page boundary, so that the pages it
    covers belong to it alone: registering it can never overlap another registered buffer's page (CUDA refuses
    that), which small heap allocations side by side otherwise could."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    start = -raw.data_ptr() % ALIGNMENT
    return raw[start:start + nbytes]


def _discard_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error behind for the next kernel launch check, which would raise it in
    unrelated code; one tiny kernel and a sync take it here, where it is already handled."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:  # torch.AcceleratorError is one
        pass


def _release(buffer: torch.Tensor, holder) -> None:
    """Called once the group is gone; holding `buffer` keeps its memory allocated until it is unregistered."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    holder.release(buffer.numel())


class PinnedGroup:
    """CPU copies of `tensors` (from any device) packed into one buffer, page-locked while the group is alive.

    `tensors` holds the copies (views into the buffer, in the given order, same shapes and dtypes); `pinned`
    says whether the page-locking took. Without CUDA, past the budget, or if the driver refuses, the copies are
    ordinary memory: transfers from them are correct, only not asynchronous. Keep the group as long as its
    tensors are used.
    """

    _refusal_logged = False

    def __init__(self, tensors: list[torch.Tensor]):
        self.buffer = _whole_pages(packed_bytes(tensors))
        self.pinned = torch.cuda.is_available() and self.buffer.numel() > 0 and self._register()
        if self.pinned:
            release = weakref.finalize(self, _release, self.buffer, ledger)
            release.atexit = False  # at exit the process frees everything; CUDA may already be shut down
        self.tensors, offset = [], 0
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            view = self.buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor, non_blocking=self.pinned)  # from a GPU into page-locked memory: at full speed
            self.tensors.append(view)
            offset += _aligned(nbytes)
        if self.pinned:
            for device in {t.device for t in tensors if t.device.type == "cuda"}:
                torch.cuda.synchronize(device)  # the copies are read on the CPU from now on

    def _register(self) -> bool:
        nbytes = self.buffer.numel()
        if not ledger.reserve(nbytes):
            self._log_once("Lens: the page-locked memory budget is used up (%.2f GB more asked for); weights stay in "
                           "ordinary memory from here on: outputs are the same, their copies to the GPU are slower. "
                           "Set LENS_PINNED_MEMORY_GB to change the budget.", nbytes / 1e9)
            return False
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(self.buffer.data_ptr(), nbytes, 0)
        if result == cudart.cudaError.success:
            return True
        ledger.release(nbytes)
        _discard_cuda_error()
        self._log_once("Lens: the GPU driver refused to page-lock %.2f GB of weights (%s); they stay in ordinary "
                       "memory: outputs are the same, their copies to the GPU are slower.", nbytes / 1e9,
                       cudart.cudaGetErrorString(result))
        return False

    @staticmethod
    def _log_once(message: str, *args) -> None:
        if not PinnedGroup._refusal_logged:
            PinnedGroup._refusal_logged = True
            log.warning(message, *args)
