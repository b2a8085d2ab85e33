"""The command line refuses every bad input with one line and exit code 2, before it loads or writes anything."""

import json
import os
import stat

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
    (["--width", "1000", "--height", "1024"], "both sides must be positive multiples of 16 (e.g. 1008x1024)"),
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


@pytest.mark.parametrize("device,message", [("gpu", "'gpu' is not a device name"), ("cuda", "device cuda is not available")])
def test_an_unusable_device_is_refused_before_loading(model_paths, no_loading, capsys, monkeypatch, device, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(generate_args(model_paths, "--device", device)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not no_loading


def test_a_wrong_file_in_a_later_slot_is_found_before_anything_loads(tmp_path, no_loading, capsys):
    from model_files import random_dit_state, write_single
    from safetensors.torch import save_file
    from te_files import hf_reference, write_comfy_nvfp4

    from lens_core.demo import demo_vae

    write_single(random_dit_state(), tmp_path / "dit.safetensors")
    write_comfy_nvfp4(hf_reference()[0], tmp_path / "te.safetensors")
    save_file({k: v.contiguous() for k, v in demo_vae().model.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    args = generate_args(tmp_path)
    args[args.index("--vae") + 1] = str(tmp_path / "dit.safetensors")  # the denoiser in the VAE slot
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dit.safetensors: this looks like a Lens denoiser (DiT), not the Lens VAE" in err and not no_loading


def test_batch_seeds_wrap_like_the_noise_and_the_png_is_written_whole(tmp_path):
    out = tmp_path / "d.png"
    assert main(["demo", "--out", str(out), "--steps", "1", "--batch", "2", "--seed", str(2**64 - 1),
                 "--width", "64", "--height", "64"]) == 0
    seeds = [json.loads(Image.open(tmp_path / f"d_{i:02d}.png").text["lens"])["seed"] for i in range(2)]
    assert seeds == [2**64 - 1, 0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from PIL import Image as PilImage

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PilImage.Image, "save", full_disk)
    out = tmp_path / "d.png"
    assert main(["demo", "--out", str(out), "--steps", "1", "--width", "64", "--height", "64"]) == 1
    err = capsys.readouterr().err
    assert f"error: could not write {out}: No space left on device" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    import lens_core.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lens_core.cli, "_save", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--steps", "1", "--width", "64", "--height", "64"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was written" in err and "Traceback" not in err


def test_help_names_the_program_and_the_demo_defaults(capsys):
    import subprocess
    import sys

    for argv, prog in ((["--help"], "lens"), (["demo", "--help"], "lens demo")):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"usage: {prog}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = capsys.readouterr().out
    assert "default: 4" in demo_help and "Base 50" not in demo_help and "what to draw" in demo_help
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lens {lens_core.__version__}"
    from pack import ROOT

    module_help = subprocess.run([sys.executable, "-m", "lens_core", "--help"], capture_output=True, text=True,
                                 cwd=ROOT).stdout
    assert module_help.startswith("usage: python -m lens_core")


def test_the_version_is_written_once_and_the_changelog_names_it():
    """lens_core/_version.py is the one place: pyproject.toml reads it (setuptools and comfy-cli, for the Registry), and
    the CHANGELOG's latest release is that version."""
    from comfy_cli.registry.config_parser import extract_node_configuration
    from pack import ROOT

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert extract_node_configuration(str(ROOT / "pyproject.toml")).project.version == lens_core.__version__
    releases = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert releases[0].startswith(f"## {lens_core.__version__} ("), releases[0]


def test_the_png_gets_the_permissions_any_new_file_gets(tmp_path):
    """A temporary file is private (0600); the image renamed from it must be readable as the umask allows."""
    old = os.umask(0o022)
    try:
        assert main(["demo", "--out", str(tmp_path / "d.png"), "--steps", "1", "--width", "64", "--height", "64"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d.png").stat().st_mode) == 0o644


def test_a_prompt_with_a_byte_that_is_not_utf8_is_drawn_and_stored(tmp_path):
    """A non-UTF-8 byte in a command-line argument arrives as a lone surrogate; the PNG's text chunk stores U+FFFD."""
    out = tmp_path / "d.png"
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert main(["demo", "--out", str(out), "--steps", "1", "--width", "64", "--height", "64", "--prompt", prompt]) == 0
    assert json.loads(Image.open(out).text["lens"])["prompt"] == "caf\ufffd"


def test_help_and_a_missing_file_name_the_gguf_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a Lens GGUF (lens_turbo-q8_0.gguf" in help_text and "llama.cpp's gpt-oss-20b-mxfp4.gguf" in help_text
    args = ["generate", "--dit", str(tmp_path / "gone.gguf"), "--text-encoder", str(tmp_path), "--vae", str(tmp_path),
            "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "a Lens GGUF (lens_turbo-q8_0.gguf" in capsys.readouterr().err
