"""Everything the nodes need from ComfyUI, with plain fallbacks so the pack imports and runs without it.

Inside ComfyUI: model folders from `folder_paths`, devices and interruption from
`comfy.model_management`, progress and previews from `comfy.utils.ProgressBar`. Outside (tests,
scripts): a models folder set with `set_models_dir` (or $LENS_MODELS_DIR), the CPU, and no-ops.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..lens_core.device import default_device
from ..lens_core.memory import pinned
from .comfy_models import REPLACED_METHODS

try:
    import folder_paths
except ImportError:
    folder_paths = None
try:
    import comfy.model_management as model_management
    import comfy.model_patcher as model_patcher
    import comfy.utils as comfy_utils
    from comfy.cli_args import LatentPreviewMethod
    from comfy.cli_args import args as comfy_args
except ImportError:
    model_management = None
    model_patcher = None
    comfy_utils = None
    comfy_args = None


try:
    import comfy.memory_management as memory_management
except ImportError:
    memory_management = None

if model_management is not None and hasattr(model_management, "pin_memory") and hasattr(model_management, "unpin_memory"):
    pinned.provider = pinned.ComfyUIPinnedMemory(model_management)  # ComfyUI's page-locking and budget, not the pack's own


def dynamic_vram() -> bool:
    """Whether ComfyUI runs with dynamic VRAM (its own weight streaming, which loads models in a worker thread)."""
    return bool(getattr(memory_management, "aimdo_enabled", False))


def model_manager_takes_lens_models() -> bool:
    """Whether Lens models go through ComfyUI's model manager (comfy_models.py), decided from the API that is present,
    never from an error (with dynamic VRAM an error raised while loading reaches only ComfyUI's loader thread): a
    ComfyUI with `load_models_gpu` and the classic ModelPatcher, without dynamic VRAM. Otherwise the nodes move the
    models themselves, after asking ComfyUI to free the memory (managed.py)."""
    if model_management is None or model_patcher is None or dynamic_vram():
        return False
    base = getattr(model_patcher, "ModelPatcher", None)
    return hasattr(model_management, "load_models_gpu") and base is not None and all(hasattr(base, m) for m in REPLACED_METHODS)


FOLDERS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip"), "vae": ("vae",),
           "loras": ("loras",)}
_models_dir = Path(os.environ.get("LENS_MODELS_DIR", "models"))


def set_models_dir(path) -> None:
    """Outside ComfyUI: the folder that holds diffusion_models/, text_encoders/, vae/ and loras/."""
    global _models_dir
    _models_dir = Path(path)


GGUF_KINDS = ("diffusion_models", "text_encoders")  # where GGUF files are offered (ComfyUI's own lists leave .gguf out)


def _files_in(folder: Path, pattern: str) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob(pattern)} if folder.is_dir() else set()


def list_models(kind: str) -> list[str]:
    """The model files of a kind for a loader's dropdown: ComfyUI's list inside ComfyUI, plus the .gguf files of the
    same folders where the pack reads GGUF."""
    patterns = ("*.gguf",) if kind in GGUF_KINDS else ()
    if folder_paths is not None:
        names = set(folder_paths.get_filename_list(kind))
        folders = [Path(p) for p in folder_paths.get_folder_paths(kind)] if patterns else []
    else:
        names, folders, patterns = set(), [_models_dir / sub for sub in FOLDERS[kind]], ("*.safetensors", *patterns)
    for folder in folders:
        for pattern in patterns:
            names |= _files_in(folder, pattern)
    return sorted(names)


def model_path(kind: str, name: str) -> str:
    if folder_paths is not None:
        return folder_paths.get_full_path_or_raise(kind, name)
    for sub in FOLDERS[kind]:
        path = _models_dir / sub / name
        if path.exists():
            return str(path)
    raise FileNotFoundError(f"{name} is not in {', '.join(str(_models_dir / s) for s in FOLDERS[kind])}.")


def compute_device() -> torch.device:
    """Where the models compute: ComfyUI's choice inside ComfyUI (it honours --cpu, --directml, ...), else torch's best."""
    if model_management is not None:
        return model_management.get_torch_device()
    return default_device()


def intermediate_device() -> torch.device:
    """Where LATENT and CONDITIONING tensors live between nodes: ComfyUI's choice (the CPU unless --gpu-only)."""
    if model_management is not None:
        return model_management.intermediate_device()
    return torch.device("cpu")


def offload_device() -> torch.device:
    return model_management.unet_offload_device() if model_management is not None else torch.device("cpu")


def free_memory_for(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until `nbytes` fit on `device` (no-op outside ComfyUI)."""
    if model_management is not None and device.type != "cpu":
        model_management.free_memory(nbytes, device)


def release_memory() -> None:
    if model_management is not None:
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_cancel() -> bool:
    """For `sample(should_stop=...)`: raises ComfyUI's own interrupt exception when the user pressed
    Cancel (ComfyUI reports that as a cancelled run, not an error); otherwise False."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()
    return False


def previews_enabled() -> bool:
    """False when ComfyUI runs with --preview-method none (its default): then no preview is rendered."""
    return comfy_args is None or comfy_args.preview_method != LatentPreviewMethod.NoPreviews


class Progress:
    """ComfyUI's progress bar with latent previews; silent outside ComfyUI."""

    def __init__(self, total: int):
        self.bar = comfy_utils.ProgressBar(total) if comfy_utils is not None else None

    @property
    def shows_previews(self) -> bool:
        """Whether a preview image would be seen: only then is an x0 estimate copied off the GPU and rendered."""
        return self.bar is not None and previews_enabled()

    def update(self, step: int, total: int, preview_image=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(step, total, ("JPEG", preview_image, 512) if preview_image is not None else None)
