"""`pip wheel .` builds lens_core as an installable library that works outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from pack import ROOT

pytest.importorskip("setuptools", reason="building the wheel needs setuptools (requirements-test.txt installs it)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy, so the build leaves no build/ or *.egg-info in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
                   check=True, cwd=out, capture_output=True)
    (path,) = out.glob("comfyui_lens-*.whl")
    return path


def test_wheel_holds_the_library_and_nothing_of_the_node_pack(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lens_core/__init__.py" in names and "lens_core/dit/model.py" in names
    assert "lens_core/data/o200k_base.tiktoken.gz" in names
    assert not any(n.startswith(("nodes/", "tests/", "bench/", "workflows/")) for n in names)
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "lens = lens_core.cli:main" in entry_points


def test_installed_library_imports_and_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = "import lens_core, lens_core.text.tokenizer as t; print(lens_core.__file__); print(len(t.load_tokenizer().encode('a red fox')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    location, tokens = done.stdout.split()
    assert location.startswith(str(site)) and int(tokens) > 0
