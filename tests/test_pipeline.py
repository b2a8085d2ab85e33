"""The pipeline, presets and the command line, end to end on tiny files in the real formats."""

import json

import pytest
import torch
from model_files import random_dit_state, write_single
from PIL import Image
from safetensors.torch import save_file
from te_files import hf_reference, write_comfy_nvfp4

from lens_core import LensInputError
from lens_core.cli import main
from lens_core.demo import DEMO_VAE, demo_models, demo_vae
from lens_core.pipeline import LensPipeline
from lens_core.presets import BUCKETS, bucket_size, check_variant_settings, guess_variant, size_warnings


def test_buckets_are_trained_sizes():
    for table in BUCKETS.values():
        assert len(table) == 9
        for aspect, (h, w) in table.items():
            assert h % 16 == 0 and w % 16 == 0
            num, den = map(int, aspect.split(":"))
            assert abs(w / h - num / den) < 0.05, aspect
    assert bucket_size("16:9") == (768, 1376) and bucket_size("1:2", 1440) == (2080, 1040)


def test_size_checks():
    assert size_warnings(1024, 1024) == []
    assert "aspect" in size_warnings(512, 1536)[0]
    assert "MP" in size_warnings(1600, 1600)[0]
    with pytest.raises(LensInputError, match="multiples of 16"):
        size_warnings(1000, 1024)


def test_variant_guess_and_warnings():
    assert guess_variant("models/lens_turbo_bf16.safetensors") == "turbo"
    assert guess_variant("lens_bf16.safetensors") == "lens"
    assert guess_variant("x/lens-base.safetensors") == "base"
    assert guess_variant("custom.safetensors", {"modelspec.title": "Lens-Turbo"}) == "turbo"
    assert check_variant_settings("turbo", 20, 5.0) and check_variant_settings("lens", 4, 1.0)
    assert not check_variant_settings("turbo", 4, 1.0) and not check_variant_settings("lens", 20, 5.0)


@pytest.fixture(scope="module")
def demo_pipe():
    return LensPipeline(*demo_models())


def test_pipeline_deterministic_and_seed_dependent(demo_pipe):
    a = demo_pipe("a cat", steps=2, cfg=5.0, seed=1, height=64, width=96)
    b = demo_pipe("a cat", steps=2, cfg=5.0, seed=1, height=64, width=96)
    c = demo_pipe("a cat", steps=2, cfg=5.0, seed=2, height=64, width=96)
    assert a[0].size == (96, 64)
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()


def test_pipeline_refuses_bad_input_before_work(demo_pipe):
    for kwargs, match in [({"steps": 0}, "steps"), ({"cfg": -1.0}, "cfg"), ({"height": 100}, "multiples of 16"), ({"batch": 0}, "batch")]:
        with pytest.raises(LensInputError, match=match):
            demo_pipe("x", **kwargs)


def test_img2img(demo_pipe):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    out = demo_pipe("x", steps=4, cfg=1.0, init_image=image, denoise=0.5)
    assert out[0].size == (64, 64)


def test_demo_command_writes_png_with_settings(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--width", "64", "--height", "64", "--prompt", "a red fox"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    settings = json.loads(image.text["lens"])
    assert settings["prompt"] == "a red fox" and settings["steps"] == 4 and settings["seed"] == 0


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A DiT (bf16), a Comfy-Org NVFP4 GPT-OSS with the real vocabulary and 24 layers, and an ldm VAE."""
    folder = tmp_path_factory.mktemp("models")
    dit_cfg = __import__("lens_core").DiTConfig(hidden=128, heads=2, blocks=2, mlp_hidden=341, text_width=64, text_layers=4)
    write_single(random_dit_state(dit_cfg), folder / "lens_turbo_bf16.safetensors")
    model, _ = hf_reference(layers=24, experts=4, top_k=4, window=128, vocab=201088)
    write_comfy_nvfp4(model, folder / "gpt_oss_20b_nvfp4.safetensors")
    vae = demo_vae()
    state = {k: v for k, v in vae.model.state_dict().items()}
    state["bn.running_var"] = torch.full_like(state["bn.running_var"], 2.0)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "flux2-vae.safetensors"))
    assert DEMO_VAE.downscale == 8
    return folder


def test_generate_command_end_to_end(model_files, tmp_path):
    out = tmp_path / "x.png"
    args = ["generate", "--dit", str(model_files / "lens_turbo_bf16.safetensors"),
            "--text-encoder", str(model_files / "gpt_oss_20b_nvfp4.safetensors"), "--vae", str(model_files / "flux2-vae.safetensors"),
            "--prompt", "a lighthouse", "--width", "64", "--height", "48", "--seed", "3", "--batch", "2", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    first, second = Image.open(tmp_path / "x_00.png"), Image.open(tmp_path / "x_01.png")
    assert first.size == (64, 48)
    settings = json.loads(first.text["lens"])
    assert settings["steps"] == 4 and settings["cfg"] == 1.0 and "Lens-Turbo" in settings["model"]  # variant from the name
    assert json.loads(second.text["lens"])["seed"] == 4
    assert first.tobytes() != second.tobytes()


def test_generate_command_reports_wrong_file(model_files, tmp_path, capsys):
    args = ["generate", "--dit", str(model_files / "flux2-vae.safetensors"), "--text-encoder", str(model_files / "gpt_oss_20b_nvfp4.safetensors"),
            "--vae", str(model_files / "flux2-vae.safetensors"), "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "not a Lens denoiser" in capsys.readouterr().err


def test_readme_python_snippet_runs_as_written(model_files, tmp_path):
    """The README's Python API block, unchanged, in a folder holding tiny files under the Comfy-Org names."""
    import os
    import re
    import subprocess
    import sys

    from pack import ROOT

    readme = (ROOT / "README.md").read_text()
    (snippet,) = re.findall(r"## Python API.*?```python\n(.*?)```", readme, flags=re.S)
    for f in model_files.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "snippet.py").write_text(snippet + "\nprint(tuple(image.shape), float(image.min()) >= -1, float(image.max()) <= 1)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), LENS_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 3, 1024, 1024) True True"
    assert Image.open(tmp_path / "lighthouse.png").size == (1024, 1024)


@pytest.mark.parametrize("cache_state", ["corrupt", "unwritable"])
def test_a_broken_prompt_cache_still_gives_the_image(tmp_path, cache_state):
    from lens_core import PromptCache

    models = demo_models()
    reference = LensPipeline(*models)("a red fox", steps=1, seed=3, height=64, width=64)
    folder = tmp_path / "cache"
    if cache_state == "corrupt":
        LensPipeline(*models, prompt_cache=PromptCache(folder))("a red fox", steps=1, seed=3, height=64, width=64)
        for entry in folder.glob("*.safetensors"):
            entry.write_bytes(b"\0" * 5)
    else:
        folder.write_text("a file where the cache folder should be")
    images = LensPipeline(*models, prompt_cache=PromptCache(folder))("a red fox", steps=1, seed=3, height=64, width=64)
    assert [i.tobytes() for i in images] == [i.tobytes() for i in reference]
