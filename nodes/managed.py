"""Lens models as the nodes hand them around, loaded on the CPU and moved to the GPU only while used.

ComfyUI's memory manager does not know our modules, so before a move we ask it to free the memory we
need (it unloads its own models), and after use we move back to the offload device unless the user
chose to keep the model resident. Nothing stays on the GPU by accident between runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..lens_core.device import model_bytes
from .comfy_bridge import compute_device, free_memory_for, offload_device, release_memory


def _move(model, device) -> None:
    if hasattr(model, "move"):
        model.move(device)
    else:
        model.to(device)


@dataclass
class Managed:
    """A model plus where it computes; `with managed.use() as model:` puts it there for the block."""

    model: object
    device: torch.device = field(default_factory=compute_device)
    keep_loaded: bool = False
    extras: dict = field(default_factory=dict)

    @contextmanager
    def use(self):
        if self.device.type != "cpu":
            free_memory_for(model_bytes(self.model), self.device)
        _move(self.model, self.device)
        try:
            yield self.model
        finally:
            if not self.keep_loaded and self.device != offload_device():
                _move(self.model, offload_device())
                release_memory()
