"""The root `__init__.py` is ComfyUI's entry point; pytest and other tools may also import it on their own."""

import importlib.util
import shutil
import subprocess
import sys

from pack import ROOT, import_pack


def test_comfyui_import_registers_the_nodes():
    pack = import_pack("comfyui-lens")  # ComfyUI names the module after the folder, hyphen and all
    assert "LensPackModelLoader" in pack.NODE_CLASS_MAPPINGS


def test_import_without_a_parent_package_registers_nothing_and_does_not_fail():
    """What pytest does in a clone named `comfyui-lens` (not a valid package name): it imports the root
    `__init__.py` as a top-level module, where relative imports cannot work."""
    spec = importlib.util.spec_from_file_location("__init__", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")


def test_suite_runs_in_a_folder_whose_name_is_not_a_python_name(tmp_path):
    """The README clones into `custom_nodes/comfyui-lens`; the suite must run there too."""
    clone = tmp_path / "comfyui-lens"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", ".venv", "golden", "__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_pack_entry.py::test_comfyui_import_registers_the_nodes"],
                            cwd=clone, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
