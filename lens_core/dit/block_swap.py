"""Block swap: some of the denoiser's blocks stay in (page-locked) CPU memory and are streamed to the GPU as they run.

Each swapped block is copied to the compute device just before it is needed, on a side CUDA stream and one
swapped block ahead, so the copy of block i+1 overlaps the compute of block i; the copies are dropped after
use. The model's weights on the GPU shrink by the swapped blocks' bytes (85 M parameters, 170 MB in bf16,
each), at the price of one host-to-device copy of them per forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..device import model_bytes
from ..memory.host_copies import HostCopies, move_module, pin_in_place

_RESERVE_BYTES = 4 << 30  # activations of a 1440x1440 CFG step with room to spare


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


class BlockSwap:
    """Which blocks live on the CPU, and how they reach the compute device.

    It holds indices, not blocks: a denoiser with LoRAs shares it with its base but runs its own (wrapped) blocks.
    The swapped blocks' weights are the model's page-locked host copies (memory/host_copies.py): wherever they were, they
    end up there, at their exact size and within the page-locked budget, and count as the model's CPU copy.
    """

    def __init__(self, blocks: nn.ModuleList, indices: list[int], copies: HostCopies):
        self.indices = sorted(indices)
        self._stream = None
        for index in self.indices:
            move_module(blocks[index], "cpu", copies=copies)
            pin_in_place(blocks[index], copies)

    def __contains__(self, index: int) -> bool:
        return index in self.indices

    def nbytes(self, blocks: nn.ModuleList) -> int:
        return sum(model_bytes(blocks[i]) for i in self.indices)

    def fetch(self, block: nn.Module, device: torch.device):
        """Start copying a swapped block to `device`; returns what `run` needs. On CUDA the copy runs on a side stream."""
        tensors = block_tensors(block)
        if device.type != "cuda":
            return {name: t.to(device) for name, t in tensors.items()}, None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            copied = {name: t.to(device, non_blocking=True) for name, t in tensors.items()}
        return copied, self._stream

    def run(self, block: nn.Module, fetched, *args):
        """Run a swapped block with its fetched weights (waiting for their copy first)."""
        weights, stream = fetched
        if stream is not None:
            current = torch.cuda.current_stream(stream.device)
            current.wait_stream(stream)
            for t in weights.values():
                t.record_stream(current)  # memory the side stream allocated, used on this one
        return functional_call(block, weights, args)

    def next_after(self, index: int) -> int | None:
        later = [i for i in self.indices if i > index]
        return later[0] if later else None


def auto_blocks_on_cpu(model_bytes: int, block_bytes: int, blocks: int, free_bytes: int, reserve: int = _RESERVE_BYTES) -> int:
    """How many blocks to keep on the CPU so that the rest of the weights plus `reserve` fit in `free_bytes`."""
    short = model_bytes + reserve - free_bytes
    return 0 if short <= 0 else min(blocks - 1, math.ceil(short / block_bytes))
