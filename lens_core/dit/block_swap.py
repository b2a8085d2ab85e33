"""Block swap (outside ComfyUI): the last blocks of the denoiser stay in page-locked CPU memory and are streamed to the
GPU as they run.

Each swapped block's weights are copied to the compute device on a side CUDA stream while the block before it
computes, and dropped after use: at most one swapped block's copy waits ahead of the one running. The model's
weights on the GPU shrink by the swapped blocks' bytes (85 M parameters, 170 MB in bf16, each), at the price of one
host-to-device copy of them per forward. Inside ComfyUI, ComfyUI's own partial loading does this job.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.func import functional_call

_RESERVE_BYTES = 4 << 30  # activations of a 1440x1440 CFG step with room to spare


class BlockSwap:
    """Which blocks live in CPU memory (`indices`), and `streamed(blocks, device)`: the denoiser's blocks in order,
    each ready to call, a swapped one as a call on a copy of its weights."""

    def __init__(self, indices: list[int]):
        self.indices = sorted(indices)
        self._stream = None

    def prefixes(self) -> tuple[str, ...]:
        """The swapped blocks' weight names, which stay in CPU memory."""
        return tuple(f"transformer_blocks.{index}." for index in self.indices)

    def streamed(self, blocks: nn.ModuleList, device: torch.device):
        """The first swapped block's copy starts before block 0 runs; each next one's when the swapped block before it
        starts computing, so its copy overlaps that compute."""
        following = iter(self.indices)
        fetched = {}

        def fetch_next() -> None:
            index = next(following, None)
            if index is not None:
                fetched[index] = self._fetch(blocks[index], device)

        def run_swapped(index: int, *args):
            weights, stream = fetched.pop(index)  # held by this call only: gone when it returns
            fetch_next()
            if stream is not None:
                current = torch.cuda.current_stream(stream.device)
                current.wait_stream(stream)
                for t in weights.values():
                    t.record_stream(current)  # memory the side stream allocated, used on this one
            return functional_call(blocks[index], weights, args)

        fetch_next()
        swapped = set(self.indices)
        for index, block in enumerate(blocks):
            yield functools.partial(run_swapped, index) if index in swapped else block

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


def auto_blocks_on_cpu(model_bytes: int, block_bytes: int, blocks: int, free_bytes: int, reserve: int = _RESERVE_BYTES) -> int:
    """How many blocks to keep on the CPU so that the rest of the weights plus `reserve` fit in `free_bytes`."""
    short = model_bytes + reserve - free_bytes
    return 0 if short <= 0 else min(blocks - 1, math.ceil(short / block_bytes))
