"""Everything the nodes take from ComfyUI, imported in this one place.

Inside ComfyUI every name below is ComfyUI's module. Outside it (tests, scripts that import the pack) they are None
and the pack still imports: the nodes' definitions load, the model dropdowns list a models folder set with
`set_models_dir` (or $LENS_MODELS_DIR), and running a node that needs ComfyUI says so.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..lens_core.errors import LensInputError

try:
    import folder_paths
except ImportError:
    folder_paths = None
try:
    import comfy.conds as conds
    import comfy.latent_formats as latent_formats
    import comfy.lora as lora
    import comfy.model_base as model_base
    import comfy.model_management as model_management
    import comfy.model_patcher as model_patcher
    import comfy.ops as ops
    import comfy.patcher_extension as patcher_extension
    import comfy.sample as sample
    import comfy.samplers as samplers
    import comfy.supported_models as supported_models
    import comfy.supported_models_base as supported_models_base
    import comfy.utils as utils
    import latent_preview
except ImportError:
    conds = latent_formats = lora = model_base = model_management = model_patcher = ops = patcher_extension = None
    sample = samplers = supported_models = supported_models_base = utils = latent_preview = None

log = logging.getLogger("lens_core")
WARNING_EVENT = "lens.warning"  # web/lens_warnings.js shows these as toasts


def show_in_ui(message: str) -> None:
    """Show a warning in ComfyUI's page (a toast, web/lens_warnings.js), sent to the client that queued the prompt
    through the server ComfyUI started; nothing where there is no server (a script, the tests)."""
    server = sys.modules.get("server")  # ComfyUI's own module, imported by ComfyUI before any custom node
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(WARNING_EVENT, {"message": message}, getattr(instance, "client_id", None))


def warn(message: str) -> None:
    """A warning about a result that differs from what the user set: in the console and in the page."""
    log.warning(message)
    show_in_ui(message)


def require_comfyui(what: str) -> None:
    if model_management is None:
        raise LensInputError(f"{what} runs inside ComfyUI: install the pack in ComfyUI/custom_nodes (outside ComfyUI, use "
                             "lens_core's LensPipeline or `python -m lens_core generate`).")


FOLDERS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip"), "vae": ("vae",),
           "loras": ("loras",)}
GGUF_KINDS = ("diffusion_models", "text_encoders")  # where GGUF files are offered (ComfyUI's own lists leave .gguf out)
_models_dir = Path(os.environ.get("LENS_MODELS_DIR", "models"))


def set_models_dir(path) -> None:
    """Outside ComfyUI: the folder that holds diffusion_models/, text_encoders/, vae/ and loras/."""
    global _models_dir
    _models_dir = Path(path)


def _files_in(folder: Path, pattern: str) -> set[str]:
    """Files (not folders) matching `pattern` below `folder`, found without following folder links (a link loop
    cannot hang the listing)."""
    found = set()
    if not folder.is_dir():
        return found
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.match(pattern) and path.is_file():
                found.add(str(path.relative_to(folder)))
    return found


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


def intermediate_device():
    """Where LATENT and CONDITIONING tensors live between nodes: ComfyUI's choice (the CPU unless --gpu-only)."""
    import torch

    return model_management.intermediate_device() if model_management is not None else torch.device("cpu")
