"""Lens models as the nodes hand them around: loaded on the CPU, put on their device while used.

Inside ComfyUI each model is handed to ComfyUI's model manager (see comfy_models.py), which keeps it on the GPU
between runs while memory allows and unloads it when other nodes need the room. Outside ComfyUI, or where a
ComfyUI's manager cannot take it (decided up front, comfy_bridge.model_manager_takes_lens_models), the model
moves to the GPU before use and back after (unless "keep loaded"), after asking ComfyUI to free that much memory.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..lens_core.device import device_bytes
from . import comfy_bridge
from .comfy_bridge import compute_device, free_memory_for, offload_device, release_memory
from .comfy_models import move_model, patcher_for


@dataclass
class Managed:
    """A model plus where it computes; `with managed.use() as model:` puts it there for the block.

    Loader nodes on the same file share one model (the weights); `prepare` applies this node's own settings (block
    swap, attention, expert streaming) to it each time it is used, so two nodes' settings never leak into each other.
    """

    model: object
    device: torch.device = field(default_factory=compute_device)
    keep_loaded: bool = False
    extras: dict = field(default_factory=dict)
    prepare: Callable[[object], None] | None = None

    def _load_through_comfyui(self) -> bool:
        """Let ComfyUI's manager load the model, where it takes Lens models (comfy_bridge.model_manager_takes_lens_models)."""
        if self.device.type == "cpu" or not comfy_bridge.model_manager_takes_lens_models():
            return False
        patcher = patcher_for(self.model, self.device, offload_device(), comfy_bridge.model_patcher.ModelPatcher)
        comfy_bridge.model_management.load_models_gpu([patcher], force_full_load=True)
        return True

    @contextmanager
    def use(self):
        if self.prepare is not None:
            self.prepare(self.model)
        if self._load_through_comfyui():
            move_model(self.model, self.device)  # a LoRA's own small weights; the shared rest is already there
            yield self.model
            return
        if self.device.type != "cpu":
            free_memory_for(device_bytes(self.model), self.device)
        returns = not self.keep_loaded and self.device != offload_device()
        move_model(self.model, self.device, keep_host_copy=returns)
        try:
            yield self.model
        finally:
            if returns:
                move_model(self.model, offload_device())
                release_memory()
