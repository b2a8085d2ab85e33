"""Runs in a child process: imports a real ComfyUI tree on the CPU, loads this pack as ComfyUI loads custom nodes, runs
the scenarios named on the command line (tests/comfyui_scenarios.py) and writes their results as JSON.

Usage: python comfyui_child.py <ComfyUI folder> <models folder> <work folder> <out.json> <scenario> [<scenario> ...]

A child process, because ComfyUI reads its command line and sets global state at import; one child runs several
scenarios, because importing torch and ComfyUI takes seconds. Python packages that only some ComfyUI models use and
the test environment lacks (torchvision, av, ...) are stubbed: nothing here calls them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import traceback
import types
from pathlib import Path

OPTIONAL = ("torchvision", "torchaudio", "torchsde", "av", "spandrel", "kornia", "scipy", "aiohttp", "yarl", "alembic",
            "sqlalchemy", "comfyui_frontend_package", "comfyui_workflow_templates", "comfyui_embedded_docs")


class _Stub(types.ModuleType):
    """A stand-in package whose every attribute is another stand-in (classes can derive from it)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Stub("call")

    def __mro_entries__(self, bases):
        return (object,)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_comfyui(comfy_dir: Path, work: Path):
    missing = []
    for name in OPTIONAL:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    sys.meta_path.insert(0, _StubFinder(set(missing)))
    sys.path.insert(0, str(comfy_dir))
    sys.argv = ["main.py"] if os.environ.get("LENS_COMFYUI_GPU") else ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401

    import nodes

    return nodes


def load_pack(nodes, pack_dir: Path) -> None:
    """As ComfyUI does at start: import the pack folder as a custom node and register its nodes."""
    loaded = nodes.load_custom_node(str(pack_dir))
    if hasattr(loaded, "__await__"):  # recent ComfyUI loads custom nodes with asyncio
        import asyncio

        loaded = asyncio.run(loaded)
    if not loaded or "LensPackModelLoader" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"ComfyUI did not load the pack from {pack_dir}")


def point_folders_at(models: Path, work: Path) -> None:
    import folder_paths

    for kind in ("diffusion_models", "text_encoders", "vae", "loras"):
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))


LOAD_LOG: list[str] = []


@contextlib.contextmanager
def logged(name: str):
    """The messages logger `name` emits at INFO and above meanwhile, in a list."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main() -> int:
    global LOAD_LOG
    comfy_dir, models, work, out, *scenarios = sys.argv[1:]
    comfy_dir, models, work = Path(comfy_dir), Path(models), Path(work)
    for sub in ("output", "input"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    tests = Path(__file__).resolve().parent
    sys.path.insert(0, str(tests))
    nodes = import_comfyui(comfy_dir, work)
    logging.getLogger().setLevel(logging.WARNING)
    with logged("lens_core") as LOAD_LOG:  # what the pack says as ComfyUI loads it (a scenario reads it)
        load_pack(nodes, tests.parent)
    point_folders_at(models, work)
    import comfyui_scenarios

    results = {}
    for name in scenarios:
        try:
            results[name] = {"ok": True, "value": getattr(comfyui_scenarios, name)(work)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()[-4000:]}
    Path(out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
