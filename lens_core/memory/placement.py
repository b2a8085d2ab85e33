"""Where each Lens model runs on a given device: the automatic choices of text-encoder placement and block swap.

Both compare a model's bytes with the GPU's total memory, so a 24 GB card keeps everything on the GPU and a 12 GB
card streams what does not fit; on devices other than CUDA everything stays on the compute device.
"""

from __future__ import annotations

import torch

from ..device import model_bytes
from ..dit.block_swap import auto_blocks_on_cpu

ENCODER_RESERVE_BYTES = 1_500_000_000  # CUDA context, a 512-token prompt's activations, one layer's experts decoded
TEXT_ENCODER_PLACEMENTS = ("auto", "gpu", "cpu", "gpu_stream_experts")


def streams_experts_to_fit(encoder_gpu_bytes: int, gpu_total_bytes: int, reserve: int = ENCODER_RESERVE_BYTES) -> bool:
    """Whether the text encoder needs its expert banks left in CPU memory to fit the GPU."""
    return encoder_gpu_bytes + reserve > gpu_total_bytes


def text_encoder_placement(choice: str, encoder, device: torch.device) -> str:
    """"auto": the whole encoder on the GPU where it fits the GPU's memory with room to spare (16 GB cards and up),
    else on the GPU with its expert banks streamed from CPU memory (12 GB cards and down); elsewhere the compute
    device. Any other choice is returned as it is."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "gpu"
    gpu_bytes = model_bytes(encoder) - encoder.embed_tokens.weight.nbytes  # the embedding stays in CPU memory anyway
    total = torch.cuda.get_device_properties(device).total_memory
    return "gpu_stream_experts" if streams_experts_to_fit(gpu_bytes, total) else "gpu"


def blocks_on_cpu(choice: int, dit, device: torch.device) -> int:
    """Block swap's count: `choice` (at most all blocks but one), or for -1 enough blocks on the CPU for the rest of
    the denoiser to fit the GPU's memory (0 off CUDA)."""
    if choice >= 0:
        return min(choice, dit.config.blocks - 1)
    if device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    return auto_blocks_on_cpu(model_bytes(dit), model_bytes(dit.transformer_blocks[0]), dit.config.blocks, total)
