"""Page-locked ("pinned") CPU copies of the weights that stream to the GPU, at their exact size.

Streamed weights (swapped denoiser blocks, the text encoder's expert banks) must sit in page-locked memory for
their copies to run asynchronously, overlapping compute. `Tensor.pin_memory()` allocates through PyTorch's
caching host allocator, which rounds every allocation up to a power of two: a swapped bf16 block's 170 MB of
tensors take 218 MB that way (1.28x; 24 swapped blocks: 5.24 GB instead of 4.08), an fp8 block's more. Instead,
a `PinnedGroup` packs a group's tensors (one block, one expert bank) into one ordinary CPU buffer that CUDA
page-locks in place (`cudaHostRegister`): exactly their bytes (plus < 4 KB per tensor of alignment), released
(unregistered, then freed) with the group.
"""

from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger("lens_core")

ALIGNMENT = 4096  # each tensor starts on a page boundary: aligned for every dtype and for DMA


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _discard_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error behind for the next kernel launch check, which would raise it in
    unrelated code; one tiny kernel and a sync take it here, where it is already handled."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:  # torch.AcceleratorError is one
        pass


def _unregister(buffer: torch.Tensor) -> None:
    """Called once the group is gone; holding `buffer` keeps its memory allocated until it is unregistered."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class PinnedGroup:
    """CPU copies of `tensors` packed into one buffer, page-locked while the group is alive (where CUDA is).

    `tensors` holds the copies (views into the buffer, in the given order, same shapes and dtypes); `pinned`
    says whether the page-locking took. Without CUDA, or if the driver refuses, the copies are ordinary memory:
    transfers from them are correct, only not asynchronous. Keep the group as long as its tensors are used.
    """

    _refusal_logged = False

    def __init__(self, tensors: list[torch.Tensor]):
        sizes = [t.numel() * t.element_size() for t in tensors]
        self.buffer = torch.empty(sum(_aligned(n) for n in sizes), dtype=torch.uint8)
        self.tensors, offset = [], 0
        for tensor, nbytes in zip(tensors, sizes):
            view = self.buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            self.tensors.append(view)
            offset += _aligned(nbytes)
        self.pinned = torch.cuda.is_available() and self.buffer.numel() > 0 and self._register()
        if self.pinned:
            release = weakref.finalize(self, _unregister, self.buffer)
            release.atexit = False  # at exit the process frees everything; CUDA may already be shut down

    def _register(self) -> bool:
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
        if result == cudart.cudaError.success:
            return True
        _discard_cuda_error()
        if not PinnedGroup._refusal_logged:
            PinnedGroup._refusal_logged = True
            log.warning("Lens: the GPU driver refused to page-lock %.2f GB of streamed weights (%s); they stay in "
                        "ordinary memory: outputs are the same, copies do not overlap compute.", self.buffer.numel() / 1e9,
                        cudart.cudaGetErrorString(result))
        return False
