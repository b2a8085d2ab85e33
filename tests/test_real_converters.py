"""GGUF files made by the real converters, where they are at hand: llama.cpp's `convert_hf_to_gguf.py` on a tiny
GPT-OSS in OpenAI's MXFP4 layout, loaded by the pack and compared with transformers' GptOssModel.

Runs where $LENS_LLAMA_CPP_DIR names a llama.cpp checkout (its convert_hf_to_gguf.py and gguf-py; e.g. the one
vendored in llama-cpp-python's source package); skipped elsewhere (CI tests the same layout with files written by
tests/te_files.write_llama_cpp_gguf). The converter runs in a child process on files in a temporary folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from te_files import hf_features, write_hf_mxfp4_folder

from lens_core import load_text_encoder
from lens_core.text.experts import GGUFBank
from lens_core.text.tokenizer import HARMONY_SPECIAL_TOKENS, load_tokenizer

LLAMA_CPP = os.environ.get("LENS_LLAMA_CPP_DIR")
pytestmark = pytest.mark.skipif(not LLAMA_CPP, reason="set LENS_LLAMA_CPP_DIR to a llama.cpp checkout to run this")


def test_llama_cpps_own_gpt_oss_gguf_computes_what_transformers_computes(tmp_path):
    model = write_hf_mxfp4_folder(tmp_path / "hf")
    out = tmp_path / "gpt-oss-tiny-mxfp4.gguf"
    converter = Path(LLAMA_CPP)
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py")}
    result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(tmp_path / "hf"), "--outfile", str(out),
                             "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = load_text_encoder(out, device="cpu")
    assert {b.qtype for b in encoder.modules() if isinstance(b, GGUFBank)} == {39}  # MXFP4, kept packed
    torch.manual_seed(0)
    ids = torch.randint(0, 201088, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for ours, theirs in zip(encoder.features(ids, mask, (0, 1)), hf_features(model, ids, mask, (0, 1))):
        assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() <= 1e-5
    assert load_tokenizer(out).encode("<|start|>") == [HARMONY_SPECIAL_TOKENS["<|start|>"]]  # the file's vocabulary agrees
