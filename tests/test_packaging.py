"""`pip wheel .` builds lens_core as an installable library that works outside the checkout."""

import json
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


def test_requirements_txt_leaves_comfyuis_own_packages_alone():
    """requirements.txt (what ComfyUI-Manager, the Registry and git installs use) is the wheel's dependency list
    without torch, numpy and pillow, which stay ComfyUI's own."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    assert requirements == [d for d in project["dependencies"] if d.split(">")[0] not in ("torch", "numpy", "pillow")]
    assert {"torch>=2.4", "numpy", "pillow"} <= set(project["dependencies"])


def test_registry_reads_licence_links_icon_and_models():
    """The Comfy Registry's own parser (comfy-cli) finds everything its pack page shows."""
    config_parser = pytest.importorskip("comfy_cli.registry.config_parser", reason="comfy-cli is in requirements-test.txt")
    config = config_parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert config.project.license.text == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    urls = config.project.urls
    assert urls.repository == urls.homepage == "https://github.com/lens-pack/comfyui-lens"
    assert urls.issues == urls.repository + "/issues" and urls.documentation.startswith(urls.repository)
    icon = config.tool_comfy.icon
    assert icon.startswith("https://raw.githubusercontent.com/lens-pack/comfyui-lens/main/")
    assert (ROOT / icon.split("/main/", 1)[1]).is_file()
    workflow_models = {m["url"] for p in (ROOT / "workflows").glob("*.json")
                       for n in json.loads(p.read_text())["nodes"] for m in n.get("properties", {}).get("models", [])}
    registry_models = {m.model_url for m in config.tool_comfy.models}
    assert workflow_models <= registry_models
    for model in config.tool_comfy.models:  # Comfy-Org's files sit in their folder; others (llama.cpp's GGUF) at the root
        folder, _, name = model.location.strip("/").rpartition("/")
        assert folder in ("diffusion_models", "text_encoders", "vae") and model.model_url.rsplit("/", 1)[1] == name
        assert model.model_url.endswith(model.location) or not model.model_url.startswith("https://huggingface.co/Comfy-Org/")


def test_the_test_extra_holds_what_the_test_requirements_add():
    """`pip install '.[test]'` and `pip install -r requirements-test.txt` give the tests the same packages."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    lines = [line.strip() for line in (ROOT / "requirements-test.txt").read_text().splitlines()]
    listed = [line for line in lines if line and not line.startswith(("#", "-r", "torch=="))]
    assert sorted(listed) == sorted(extra + ["pillow", "numpy"])
