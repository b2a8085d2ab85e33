"""The command line refuses every bad input with one line and exit code 2, before it loads or writes anything."""

import json

import pytest
from PIL import Image

import lens_core
import lens_core.demo
from lens_core.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: validation must come first."""
    loaded = []

    def refuse(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("a model was loaded before the inputs were checked")

    for name in ("load_dit", "load_text_encoder", "load_tokenizer", "load_vae"):
        monkeypatch.setattr(lens_core, name, refuse)
    monkeypatch.setattr(lens_core.demo, "demo_models", refuse)
    return loaded


@pytest.fixture
def model_paths(tmp_path):
    for name in ("dit.safetensors", "te.safetensors", "vae.safetensors"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def generate_args(folder, *extra):
    return ["generate", "--dit", str(folder / "dit.safetensors"), "--text-encoder", str(folder / "te.safetensors"),
            "--vae", str(folder / "vae.safetensors"), "--out", str(folder / "out" / "x.png"), *extra]


BAD_INPUTS = [
    (["--steps", "0"], "steps must be between 1 and 200, got 0."),
    (["--steps", "201"], "steps must be between 1 and 200, got 201."),
    (["--cfg", "-1"], "cfg must be between 0.0 and 20.0, got -1.0."),
    (["--width", "0", "--height", "0"], "width must be between 16 and 4096, got 0."),
    (["--width", "1024"], "give both --width and --height, or --aspect."),
    (["--width", "1000", "--height", "1024"], "both sides must be positive multiples of 16 (e.g. 992x1024)"),
    (["--width", "1024", "--height", "8192"], "height must be between 16 and 4096, got 8192."),
    (["--seed", "99999999999999999999"], "seed must be between 0 and 18446744073709551615, got 99999999999999999999."),
    (["--seed", "-1"], "seed must be between 0 and 18446744073709551615, got -1."),
    (["--batch", "0"], "batch must be between 1 and 64, got 0."),
    (["--date", "2026-13-45"], "template date '2026-13-45' is not usable"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_generate_refuses_bad_settings_before_loading(model_paths, no_loading, capsys, extra, message):
    assert main(generate_args(model_paths, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not no_loading and not (model_paths / "out").exists()


@pytest.mark.parametrize("flag,what", [("--dit", "a Lens denoiser"), ("--text-encoder", "gpt_oss_20b_nvfp4"), ("--vae", "flux2-vae")])
def test_generate_refuses_a_missing_file_before_loading_the_others(model_paths, no_loading, capsys, flag, what):
    args = generate_args(model_paths)
    args[args.index(flag) + 1] = str(model_paths / "missing.safetensors")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{flag} {model_paths / 'missing.safetensors'}: no such file or folder" in err and what in err
    assert not no_loading


@pytest.mark.parametrize("out,message", [("x.jpg", "give a .png file name"), (".", "is a folder")])
def test_output_must_be_a_png_file(model_paths, no_loading, capsys, out, message):
    args = generate_args(model_paths)
    args[args.index("--out") + 1] = str(model_paths / out)
    assert main(args) == 2 and message in capsys.readouterr().err and not no_loading


def test_demo_refuses_bad_settings_too(tmp_path, no_loading, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--steps", "0"]) == 2
    assert "steps must be between 1 and 200, got 0." in capsys.readouterr().err and not no_loading


def test_demo_honours_aspect_and_base(tmp_path):
    out = tmp_path / "sub" / "d.png"
    assert main(["demo", "--out", str(out), "--aspect", "16:9", "--steps", "1"]) == 0
    assert Image.open(out).size == (1376, 768)
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 0
    assert Image.open(out).size == (256, 256)
    assert json.loads(Image.open(out).text["lens"])["steps"] == 1
