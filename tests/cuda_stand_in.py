"""Page-locked memory, recorded, for machines without a GPU: which buffers a provider handed out, how large, and
when they were given back."""

import torch


class RecordingPinnedMemory:
    """A page-locked memory provider (lens_core.memory.pinned) that hands out ordinary CPU buffers within `limit`
    bytes and records them: `allocated` {data pointer: bytes} of the live ones, `freed` the pointers given back."""

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self.allocated: dict[int, int] = {}
        self.freed: list[int] = []

    @property
    def used(self) -> int:
        return sum(self.allocated.values())

    def allocate(self, nbytes: int):
        if self.used + nbytes > self.limit:
            return None
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.allocated[buffer.data_ptr()] = nbytes
        return buffer

    def free(self, buffer) -> None:
        assert buffer.data_ptr() in self.allocated, "given back twice, or never handed out"
        del self.allocated[buffer.data_ptr()]
        self.freed.append(buffer.data_ptr())

    def holds(self, tensor) -> bool:
        """Whether `tensor`'s memory lies in a live page-locked buffer."""
        return any(start <= tensor.data_ptr() < start + size for start, size in self.allocated.items())
