"""Block swap: some of the denoiser's blocks stay in (page-locked) CPU memory and are streamed to the GPU as they run.

Each swapped block's weights are copied to the compute device just before the block runs, on a side CUDA stream
and one swapped block ahead, so the copy of block i+1 overlaps the compute of block i; the copies are dropped
after use. The model's weights on the GPU shrink by the swapped blocks' bytes (85 M parameters, 170 MB in bf16,
each), at the price of one host-to-device copy of them per forward.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.func import functional_call

_RESERVE_BYTES = 4 << 30  # activations of a 1440x1440 CFG step with room to spare


class BlockSwap:
    """Which blocks live in CPU memory (`indices`), and how they reach the compute device: `streamed(blocks, device)`
    hands the denoiser's forward each block ready to call. It holds indices, not blocks, so a denoiser with LoRAs
    (whose patched blocks are copies) streams its own blocks."""

    def __init__(self, indices: list[int]):
        self.indices = sorted(indices)
        self._stream = None

    def __contains__(self, index: int) -> bool:
        return index in self.indices

    def prefixes(self) -> dict[str, bool]:
        """The swapped blocks' weight names, for the model's `cpu_resident`: in CPU memory, streamed."""
        return {f"transformer_blocks.{index}.": True for index in self.indices}

    def streamed(self, blocks: nn.ModuleList, device: torch.device):
        """`blocks` in order, each ready to call: a swapped block as a call with its weights copied to `device`.
        The first swapped block's copy starts before the first block runs, each next one's before the previous
        swapped block runs."""
        following = iter(self.indices)
        fetched = {}

        def fetch_next() -> None:
            index = next(following, None)
            if index is not None:
                fetched[index] = self._fetch(blocks[index], device)

        fetch_next()
        for index, block in enumerate(blocks):
            if index not in fetched:
                yield block
                continue
            weights = fetched.pop(index)
            fetch_next()
            yield functools.partial(self._run, block, weights)

    def _side_stream(self, device: torch.device):
        """The CUDA stream the copies run on (none elsewhere: there they simply run in order)."""
        if device.type != "cuda":
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _fetch(self, block: nn.Module, device: torch.device):
        tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        stream = self._side_stream(device)
        if stream is None:
            return {name: t.to(device) for name, t in tensors.items()}, None
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            copied = {name: t.to(device, non_blocking=True) for name, t in tensors.items()}
        return copied, stream

    @staticmethod
    def _run(block: nn.Module, fetched, *args):
        """Run a swapped block with its fetched weights, once their copy is done."""
        weights, stream = fetched
        if stream is not None:
            current = torch.cuda.current_stream(stream.device)
            current.wait_stream(stream)
            for t in weights.values():
                t.record_stream(current)  # memory the side stream allocated, used on this one
        return functional_call(block, weights, args)


def auto_blocks_on_cpu(model_bytes: int, block_bytes: int, blocks: int, free_bytes: int, reserve: int = _RESERVE_BYTES) -> int:
    """How many blocks to keep on the CPU so that the rest of the weights plus `reserve` fit in `free_bytes`."""
    short = model_bytes + reserve - free_bytes
    return 0 if short <= 0 else min(blocks - 1, math.ceil(short / block_bytes))
