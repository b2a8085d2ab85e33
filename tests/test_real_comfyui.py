"""The pack's models under a real ComfyUI's model manager, on the CPU: ComfyUI's own `load_models_gpu`,
`free_memory` and `unload_all_models` drive the pack's patcher (tests/test_comfy_models.py does the same against
a stand-in, which is what CI runs), and the loader's lists built on ComfyUI's `folder_paths` offer GGUF files.

Runs where $LENS_COMFYUI_DIR names a ComfyUI checkout (its Python files are enough); skipped elsewhere. It runs
in a child process, because the pack decides at import time whether it is inside ComfyUI. Modules that ComfyUI
imports only for models this test never builds (torchvision, av, ...) are stubbed where they are not installed.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMFYUI = os.environ.get("LENS_COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set LENS_COMFYUI_DIR to a ComfyUI checkout to run this")

CHILD = textwrap.dedent("""
    import sys, types, importlib
    comfyui, tests = sys.argv[1], sys.argv[2]
    for name in ("torchvision", "torchvision.transforms", "torchsde", "av", "kornia", "spandrel"):
        try:
            importlib.import_module(name)
        except Exception:
            module = types.ModuleType(name)
            module.__path__ = []
            sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.path[:0] = [comfyui, tests]
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import torch

    from pack import import_pack
    pack = import_pack()
    bridge = importlib.import_module(pack.__name__ + ".nodes.comfy_bridge")
    comfy_models = importlib.import_module(pack.__name__ + ".nodes.comfy_models")
    from lens_core import apply_loras
    from lens_core.demo import demo_dit
    from lens_core.device import device_bytes

    assert bridge.model_management is mm and bridge.model_manager_takes_lens_models()
    cpu = torch.device("cpu")
    dit = demo_dit()
    dit.swap_blocks(1)
    patcher = comfy_models.patcher_for(dit, cpu, cpu, mp.ModelPatcher)
    assert patcher.model_size() == device_bytes(dit)
    mm.load_models_gpu([patcher], force_full_load=True)
    assert any(loaded.model is patcher for loaded in mm.current_loaded_models)
    assert patcher.loaded_size() == patcher.model_size()
    lora = apply_loras(dit, [])
    assert comfy_models.patcher_for(lora, cpu, cpu, mp.ModelPatcher) is patcher  # one entry for the shared weights
    mm.load_models_gpu([patcher], force_full_load=True)  # already loaded: kept
    assert sum(loaded.model is patcher for loaded in mm.current_loaded_models) == 1
    mm.unload_all_models()
    assert not any(loaded.model is patcher for loaded in mm.current_loaded_models) and patcher.loaded_size() == 0
    assert dit.device == cpu

    import tempfile, os, folder_paths
    folder = tempfile.mkdtemp()
    for name in ("lens_turbo-Q4_K.gguf", "lens_bf16.safetensors"):
        open(os.path.join(folder, name), "wb").close()
    folder_paths.add_model_folder_path("diffusion_models", folder)
    listed = bridge.list_models("diffusion_models")
    assert {"lens_turbo-Q4_K.gguf", "lens_bf16.safetensors"} <= set(listed), listed  # ComfyUI's own list has no .gguf
    assert bridge.model_path("diffusion_models", "lens_turbo-Q4_K.gguf") == os.path.join(folder, "lens_turbo-Q4_K.gguf")
    print("ok")
""")


def test_the_pack_runs_under_a_real_comfyuis_model_manager():
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", CHILD, COMFYUI, str(tests)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:] + result.stderr[-3000:]
