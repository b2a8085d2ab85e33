"""Where a model's weights live outside ComfyUI (the library, `LensPipeline`, the command line).

One rule: everything on the compute device, except what the model keeps in CPU memory on purpose (`keep_on_cpu`:
the blocks of a block swap, streamed expert banks), which is page-locked on CUDA machines so its copies to the GPU
run asynchronously. Inside ComfyUI, ComfyUI's model manager places the models and this module is not used.

The automatic choices compare a model's bytes with the GPU's total memory, so a 24 GB card keeps everything on the
GPU and a 12 GB card streams what does not fit; on devices other than CUDA everything stays on the compute device.
"""

from __future__ import annotations

import torch
from torch import nn

from .dit.block_swap import auto_blocks_on_cpu

CPU = torch.device("cpu")
ENCODER_RESERVE_BYTES = 1_500_000_000  # CUDA context, a 512-token prompt's activations, one layer's experts decoded
TEXT_ENCODER_PLACEMENTS = ("auto", "gpu", "cpu", "gpu_stream_experts")


def named_weights(module: nn.Module):
    """(name, tensor) of every parameter and buffer, each once."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def weight_bytes(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Bytes of a module's weights (parameters and buffers), less those under the `skip` name prefixes."""
    return sum(t.numel() * t.element_size() for name, t in named_weights(module) if not name.startswith(skip))


def _moved(tensor: torch.Tensor, target: torch.device, pin: bool) -> torch.Tensor:
    if target.type == "cpu":
        cpu = tensor.to(CPU)
        return cpu.pin_memory() if pin and not cpu.is_pinned() else cpu
    return tensor.to(target, non_blocking=True)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Make the weight `name` hold `new`: in place (`.data`, as `nn.Module.to` does, so every module sharing the
    weight sees it), or where the two kinds of tensor cannot share an object (the meta device), as a new tensor in
    its module. Returns the weight object now in the module."""
    try:
        tensor.data = new
        return tensor
    except RuntimeError:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(new, requires_grad=False)
            return owner._parameters[leaf]
        owner._buffers[leaf] = new
        return new


def place(module: nn.Module, device, keep_on_cpu: tuple[str, ...] = ()) -> None:
    """Put `module`'s weights on `device`, those under the `keep_on_cpu` name prefixes in CPU memory (page-locked when
    the device is a CUDA GPU). All or nothing: when a copy fails (out of GPU memory), every weight moved so far goes
    back where it was and the error propagates, so the model is never left half on the GPU."""
    device = torch.device(device)
    moved = []
    try:
        for name, tensor in list(named_weights(module)):
            stays = device.type == "cpu" or name.startswith(keep_on_cpu)
            target, pin = (CPU, stays and device.type == "cuda") if stays else (device, False)
            if tensor.device != target or (pin and not tensor.is_pinned()):
                before = tensor.data
                moved.append((name, _assign(module, name, tensor, _moved(before, target, pin)), before))
    except BaseException:
        for name, tensor, before in reversed(moved):
            _assign(module, name, tensor, before)
        raise


def text_encoder_placement(choice: str, encoder, device: torch.device) -> str:
    """"auto": the whole encoder on the GPU where it fits the GPU's memory with room to spare (16 GB cards and up),
    else on the GPU with its expert banks streamed from CPU memory (12 GB cards and down); elsewhere the compute
    device. Any other choice is returned as it is."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "gpu"
    needed = weight_bytes(encoder, skip=encoder.keeps_on_cpu(streaming=False)) + ENCODER_RESERVE_BYTES
    return "gpu_stream_experts" if needed > torch.cuda.get_device_properties(device).total_memory else "gpu"


def blocks_on_cpu(choice: int, dit, device: torch.device) -> int:
    """Block swap's count: `choice` (at most all blocks but one), or for -1 enough blocks on the CPU for the rest of
    the denoiser to fit the GPU's memory (0 off CUDA)."""
    if choice >= 0:
        return min(choice, dit.config.blocks - 1)
    if device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    return auto_blocks_on_cpu(weight_bytes(dit), weight_bytes(dit.transformer_blocks[0]), dit.config.blocks, total)
