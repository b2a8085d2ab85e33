"""Shared fixtures: where the goldens are, and tiny random models written in the real file formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # a Python other than the test environment's: say which, instead of a traceback per test file
    pytest.exit(f"{sys.executable} has no torch: run the tests in the README's virtual environment "
                "(`python3 -m venv .venv && .venv/bin/pip install -r requirements-test.txt && .venv/bin/python -m pytest -q`).",
                returncode=4)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(os.environ.get("LENS_SHARED_DIR") or ROOT.parent / "shared")  # beside a development checkout; CI names it
SHARED_GOLDEN = SHARED / "golden"
SHIPPED_GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """The reference tensors: the shared set beside a development checkout, else the copies shipped in tests/golden
    (tests/test_golden_copies.py keeps the two identical), so a plain clone runs every exactness test."""
    for folder in (SHARED_GOLDEN, SHIPPED_GOLDEN):
        if (folder / "README.md").is_file():
            return folder
    pytest.skip(f"reference tensors not found in {SHARED_GOLDEN} or {SHIPPED_GOLDEN}")


def pytest_terminal_summary(terminalreporter):
    """One line naming any reference-exactness check that did not run (plain -q hides skip reasons)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "reference tensors not found" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"WARNING: {len(skipped)} reference-exactness tests skipped: no golden tensors found "
                                    f"({SHARED_GOLDEN} or {SHIPPED_GOLDEN}).", yellow=True)


@pytest.fixture(autouse=True)
def _private_prompt_cache(tmp_path_factory, monkeypatch):
    """Keep the on-disk prompt cache of every test out of the user's home folder."""
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lens_cache"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A ComfyUI models folder of tiny random files in the real formats, under the names Comfy-Org publishes (and GGUF
    files under the example workflow's names), for the tests that run the nodes inside a real ComfyUI."""
    from model_files import SD_CPP_DIT, SD_CPP_FILE, dequantised_by_gguf, random_dit_state, write_single
    from safetensors.torch import save_file
    from te_files import hf_reference, write_comfy_nvfp4, write_llama_cpp_gguf

    from lens_core import DiTConfig
    from lens_core.demo import demo_vae

    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / sub).mkdir()
    cfg = DiTConfig(hidden=128, heads=2, blocks=2, mlp_hidden=341, text_width=64, text_layers=4)
    write_single(random_dit_state(cfg, seed=1), root / "diffusion_models" / "lens_bf16.safetensors")
    write_single(random_dit_state(cfg), root / "diffusion_models" / "lens_turbo_bf16.safetensors")
    (root / "diffusion_models" / "lens_turbo-q8_0.gguf").symlink_to(SD_CPP_FILE)  # stable-diffusion.cpp's output, every type
    write_single(dequantised_by_gguf(SD_CPP_FILE), root / "diffusion_models" / "lens_turbo_dense.safetensors", dtype=torch.float32)
    model, cfg = hf_reference(layers=24, experts=4, top_k=4, window=128, vocab=201088)
    write_comfy_nvfp4(model, root / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors")
    write_llama_cpp_gguf(model, cfg, root / "text_encoders" / "gpt-oss-20b-mxfp4.gguf")
    save_file({k: v.contiguous() for k, v in demo_vae().model.state_dict().items()}, str(root / "vae" / "flux2-vae.safetensors"))
    generator = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.{name}.lora_{part}.weight": torch.randn(shape, generator=generator) * 0.2
            for name, rows, cols in (("transformer_blocks.0.attn.img_qkv", 384, 128), ("img_in", 128, 128))
            for part, shape in (("down", (4, cols)), ("up", (rows, 4)))}
    save_file(lora, str(root / "loras" / "lens_turbo_style_lora.safetensors"))
    width = SD_CPP_DIT.hidden  # a LoRA for stable-diffusion.cpp's file: on packed layers of several types, and a plain one
    lora = {f"diffusion_model.transformer_blocks.0.{name}.lora_{part}.weight": torch.randn(shape, generator=generator) * 0.1
            for name, rows in (("attn.img_qkv", 3 * width), ("img_mlp.w1", SD_CPP_DIT.mlp_hidden), ("attn.to_out.0", width),
                               ("img_mod.1", 6 * width))
            for part, shape in (("down", (4, width)), ("up", (rows, 4)))}
    save_file(lora, str(root / "loras" / "lens_gguf_lora.safetensors"))
    return root
