"""Lens models under ComfyUI's model manager.

ComfyUI keeps a list of loaded models (`ModelPatcher`s) and moves them between the GPU and the offload device
as memory demands: it keeps them resident between runs when there is room, unloads them when another node
needs the memory, follows --lowvram / --highvram / --gpu-only, and frees them on "Unload models". Its own
`ModelPatcher` moves a model module by module and expects ComfyUI's layer classes (it would leave our packed
expert banks, fp8 buffers and VAE statistics behind), so Lens models get a subclass that moves the whole model
at once with the model's own mover. Partial loading is not offered to ComfyUI: a model is on the GPU or not
(block swap is how the denoiser fits small GPUs).
"""

from __future__ import annotations

import functools
import weakref

from ..lens_core.device import device_bytes

_patchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def move_model(model, device, keep_host_copy: bool = False) -> None:
    """Move a Lens model with everything it holds (the text encoder's packed expert banks included), through its
    page-locked host copies (lens_core/memory/host_copies.py); `keep_host_copy`: it will come back, make them now."""
    model.move(device, keep_host_copy)


class WholeModelPatching:
    """The ModelPatcher methods a Lens model replaces (put in front of ComfyUI's class by `lens_patcher_class`)."""

    def __init__(self, model, load_device, offload_device):
        super().__init__(model, load_device, offload_device, size=device_bytes(model))
        self.loaded_bytes = self.size if model.device == load_device else 0

    def loaded_size(self):
        return self.loaded_bytes

    def lowvram_patch_counter(self):
        return 0

    def current_loaded_device(self):
        return self.model.device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        newly = self.size - self.loaded_bytes
        move_model(self.model, device_to)
        self.loaded_bytes = self.size
        return newly

    def partially_unload(self, device_to, memory_to_free=0):
        freed = self.loaded_bytes
        self.unpatch_model(device_to)
        return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if device_to is not None:
            move_model(self.model, device_to)
            self.loaded_bytes = 0

    def detach(self, unpatch_all=True):
        """ComfyUI unloads with unpatch_all=True; False (a patcher replaced or collected) leaves the model where it is."""
        if unpatch_all:
            self.unpatch_model(self.offload_device)
        return self.model


# What ComfyUI's ModelPatcher must have for the replacements to be the ones it calls.
REPLACED_METHODS = tuple(name for name in vars(WholeModelPatching) if not name.startswith("_"))


@functools.lru_cache(maxsize=None)
def lens_patcher_class(base: type) -> type:
    """A ModelPatcher subclass (of ComfyUI's class `base`) for one whole Lens model."""
    return type("LensModelPatcher", (WholeModelPatching, base), {})


def patcher_for(model, load_device, offload_device, base: type):
    """The one patcher of a model, made on first use and kept for it, so ComfyUI recognises it as loaded next run.

    A denoiser with LoRAs shares its weights with the model it was made from (`base_model`): that model's
    patcher stands for both, so ComfyUI counts the weights once.
    """
    owner = getattr(model, "base_model", model)
    patcher = _patchers.get(owner)
    if patcher is None or patcher.load_device != load_device or patcher.size != device_bytes(owner):
        patcher = lens_patcher_class(base)(owner, load_device, offload_device)
        _patchers[owner] = patcher
    return patcher
