"""GGUF files made by the real converters, where they are at hand.

- llama.cpp's `convert_hf_to_gguf.py` on a tiny GPT-OSS in OpenAI's MXFP4 layout, loaded by the pack and compared
  with transformers' GptOssModel. Runs where $LENS_LLAMA_CPP_DIR names a llama.cpp checkout (its
  convert_hf_to_gguf.py and gguf-py; e.g. the one vendored in llama-cpp-python's source package). Its output is not
  shipped: GPT-OSS's 201,088-token vocabulary makes even a tiny model's file over 13 MB; CI tests the same layout with
  files written by tests/te_files.write_llama_cpp_gguf.
- stable-diffusion.cpp's converter (`sd-cli -M convert`), the one the published Lens GGUFs come from, on tiny Lens
  denoisers. Runs where $LENS_SD_CPP_CLI names its `sd-cli`. CI runs its shipped output,
  tests/converted/lens_tiny_sd_cpp_mixed.gguf (tests/test_gguf.py); the first test here remakes that file.

The converters run in child processes on files in a temporary folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_files import SD_CPP_DIT, SD_CPP_FILE, SD_CPP_RULES, SD_CPP_SEED, dequantised_by_gguf, dit_inputs, random_dit_state, write_single
from te_files import hf_features, write_hf_mxfp4_folder

from lens_core import DiTConfig, load_dit, load_text_encoder
from lens_core.quant.gguf_blocks import TYPES
from lens_core.quant.layers import PackedBank, PackedLinear
from lens_core.text.tokenizer import HARMONY_SPECIAL_TOKENS, load_tokenizer

LLAMA_CPP = os.environ.get("LENS_LLAMA_CPP_DIR")
SD_CPP_CLI = os.environ.get("LENS_SD_CPP_CLI")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="set LENS_LLAMA_CPP_DIR to a llama.cpp checkout to run this")
needs_sd_cpp = pytest.mark.skipif(not SD_CPP_CLI, reason="set LENS_SD_CPP_CLI to stable-diffusion.cpp's sd-cli to run this")


@needs_llama_cpp
def test_llama_cpps_own_gpt_oss_gguf_computes_what_transformers_computes(tmp_path):
    model = write_hf_mxfp4_folder(tmp_path / "hf")
    out = tmp_path / "gpt-oss-tiny-mxfp4.gguf"
    converter = Path(LLAMA_CPP)
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py")}
    result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(tmp_path / "hf"), "--outfile", str(out),
                             "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = load_text_encoder(out, device="cpu")
    assert {b.format.qtype for b in encoder.modules() if isinstance(b, PackedBank)} == {39}  # MXFP4, kept packed
    torch.manual_seed(0)
    ids = torch.randint(0, 201088, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for ours, theirs in zip(encoder.features(ids, mask, (0, 1)), hf_features(model, ids, mask, (0, 1))):
        assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() <= 1e-5
    assert load_tokenizer(out).encode("<|start|>") == [HARMONY_SPECIAL_TOKENS["<|start|>"]]  # the file's vocabulary agrees


def sd_cpp_convert(source: Path, out: Path, type_name: str, rules: str = "") -> Path:
    command = [SD_CPP_CLI, "-M", "convert", "--diffusion-model", str(source), "-o", str(out), "--type", type_name]
    if rules:
        command += ["--tensor-type-rules", rules]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.is_file(), (result.stdout + result.stderr)[-3000:]
    return out


@needs_sd_cpp
def test_the_shipped_stable_diffusion_cpp_file_is_what_its_converter_makes(tmp_path):
    source = write_single(random_dit_state(SD_CPP_DIT, seed=SD_CPP_SEED), tmp_path / "lens_tiny_bf16.safetensors")
    made = sd_cpp_convert(source, tmp_path / SD_CPP_FILE.name, "q8_0", SD_CPP_RULES)
    assert SD_CPP_FILE.is_file() and made.read_bytes() == SD_CPP_FILE.read_bytes(), \
        f"the converter now writes another file: see why, then copy {made} to {SD_CPP_FILE}"


@needs_sd_cpp
@pytest.mark.parametrize("type_name, qtype", [("q8_0", 8), ("q4_K", 12), ("q6_K", 14)])
def test_stable_diffusion_cpps_whole_model_conversions_stay_quantised_and_compute_as_gguf_dequantises_them(tmp_path, type_name, qtype):
    config = DiTConfig(hidden=256, heads=2, blocks=2, mlp_hidden=512, text_width=256, text_layers=4)
    source = write_single(random_dit_state(config, seed=1), tmp_path / "lens_bf16.safetensors")
    converted = sd_cpp_convert(source, tmp_path / f"lens_{type_name}.gguf", type_name)
    model = load_dit(converted, device="cpu", dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert {m.format.qtype for m in layers} == {qtype}
    assert sum(m.weight.numel() for m in layers) == sum(m.in_features * m.out_features for m in layers) // TYPES[qtype].values * TYPES[qtype].nbytes
    dense = load_dit(write_single(dequantised_by_gguf(converted), tmp_path / "dense.safetensors", dtype=torch.float32), device="cpu",
                     dtype=torch.float32)
    with torch.no_grad():
        out = model(*dit_inputs(config.text_width))
        assert out.isfinite().all() and torch.allclose(out, dense(*dit_inputs(config.text_width)), rtol=1e-5, atol=1e-6)
