"""Checks that need a CUDA GPU (marked `cuda`, skipped elsewhere): the GPU paths agree with the CPU reference, the
placement outside ComfyUI moves whole models on and off the GPU, and (tests/test_comfyui.py's scenarios, on the GPU)
the pack runs inside real ComfyUI releases with every model on the GPU."""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SHARED
from model_files import TINY_DIT, mxfp8_state, random_dit_state, write_single
from safetensors.torch import save_file

from lens_core import load_dit
from lens_core.quant import formats
from lens_core.quant.layers import PackedLinear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def inputs(device):
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    return (torch.randn(2, 20, 128, device=device), torch.tensor([0.8, 0.2], device=device),
            torch.randn(2, 6, 4, 48, device=device) * mask[..., None, None].to(device), mask.to(device), (4, 5))


def test_bf16_cuda_matches_fp32_cpu(tmp_path):
    path = write_single(random_dit_state(), tmp_path / "dit.safetensors", dtype=torch.float32)
    cpu = load_dit(path, device="cpu", dtype=torch.float32)
    gpu = load_dit(path, device="cuda", dtype=torch.bfloat16)
    x, sigma, text, mask, grid = inputs("cpu")
    reference = cpu(x, sigma.bfloat16().float(), text, mask, grid)
    out = gpu(x.cuda(), sigma.cuda(), text.cuda(), mask.cuda(), grid).float().cpu()
    assert (out - reference).norm() / reference.norm() < 0.03


def test_mxfp8_on_cuda_matches_dequantised(tmp_path):
    state = random_dit_state()
    save_file(mxfp8_state(state), str(tmp_path / "mx.safetensors"))
    dit = load_dit(tmp_path / "mx.safetensors", device="cuda", dtype=torch.bfloat16)
    layers = [m for m in dit.modules() if isinstance(m, PackedLinear) and m.format is formats.MXFP8_COMFY]
    assert layers
    x, sigma, text, mask, grid = inputs("cuda")
    fast = dit(x, sigma, text, mask, grid).float()
    for module in layers:  # force the dequantise-then-matmul path on the same weights
        module.weight_function = [lambda weight: weight]
    slow = dit(x, sigma, text, mask, grid).float()
    assert (fast - slow).norm() / slow.norm() < 0.05


def test_the_pack_runs_inside_comfyui_on_the_gpu(models_dir, tmp_path):
    """tests/test_comfyui.py's scenarios with ComfyUI on the GPU (no --cpu): ComfyUI's manager loads the three models
    there, fully and partially."""
    tree = SHARED / "comfyui" / "0.12.1"
    if not (tree / "comfy").is_dir():
        pytest.skip(f"no ComfyUI source tree at {tree}")
    from test_comfyui import SCENARIOS, TESTS

    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": "", "LENS_CACHE_DIR": str(tmp_path / "cache"), "LENS_COMFYUI_GPU": "1"}
    run = subprocess.run([sys.executable, str(TESTS / "comfyui_child.py"), str(tree), str(models_dir), str(tmp_path), str(out), *SCENARIOS],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-6000:]
    results = json.loads(out.read_text())
    failed = {name: r["error"] for name, r in results.items() if not r["ok"]}
    assert not failed, failed


def test_sage_attention_matches_sdpa(tmp_path):
    pytest.importorskip("sageattention", reason="SageAttention is not installed")
    path = write_single(random_dit_state(), tmp_path / "dit.safetensors", dtype=torch.float32)
    sdpa = load_dit(path, device="cuda", dtype=torch.bfloat16)
    sage = load_dit(path, device="cuda", dtype=torch.bfloat16, attention="sage")
    x, sigma, text, mask, grid = inputs("cuda")
    reference = sdpa(x, sigma, text, None, grid).float()  # no mask: the only case SageAttention takes
    assert (sage(x, sigma, text, None, grid).float() - reference).norm() / reference.norm() < 0.05
    assert torch.equal(sage(x, sigma, text, mask, grid), sdpa(x, sigma, text, mask, grid))  # padded keys: SDPA either way


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["compiled", "compiled_cudagraphs"])
def test_compiled_blocks_match_eager_on_cuda(tmp_path, cuda_graphs):
    """Compiled blocks (and their CUDA-graph replay) give eager's velocity, over repeated calls and a second image size."""
    path = write_single(random_dit_state(), tmp_path / "dit.safetensors", dtype=torch.float32)
    eager = load_dit(path, device="cuda", dtype=torch.bfloat16)
    compiled = load_dit(path, device="cuda", dtype=torch.bfloat16)
    compiled.compile_blocks(cuda_graphs=cuda_graphs)
    x, sigma, text, mask, grid = inputs("cuda")
    for x_run, grid_run in ((x, grid), (x * 0.5, grid), (torch.randn(2, 42, 128, device="cuda"), (6, 7))):
        reference = eager(x_run, sigma, text, mask, grid_run).float()
        out = compiled(x_run, sigma, text, mask, grid_run).float()
        assert (out - reference).norm() / reference.norm() < 0.02


def test_placement_moves_whole_models_and_a_failed_move_leaves_them_where_they_were(tmp_path):
    """Outside ComfyUI: place() puts the weights on the GPU and back; nothing of the GPU copy stays referenced; a move
    that runs out of memory halfway moves every weight back."""
    path = write_single(random_dit_state(), tmp_path / "dit.safetensors", dtype=torch.float32)
    dit = load_dit(path, device="cpu", dtype=torch.bfloat16)
    x = inputs("cpu")
    with torch.no_grad():
        before = dit(*x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        dit.place("cuda")
        assert all(p.device.type == "cuda" for p in dit.parameters())
        assert (dit(*inputs("cuda")).float().cpu() - before.float()).norm() / before.float().norm() < 1e-3
        dit.place("cpu")
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == held and torch.equal(dit(*x), before)
    real_to = torch.Tensor.to
    moved = []

    def failing_to(tensor, *args, **kwargs):
        moved.append(1)
        if len(moved) == 20:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to(tensor, *args, **kwargs)

    torch.Tensor.to = failing_to
    try:
        with pytest.raises(torch.OutOfMemoryError):
            dit.place("cuda")
    finally:
        torch.Tensor.to = real_to
    assert all(p.device.type == "cpu" for p in dit.parameters())


def test_block_swap_on_cuda_matches_the_model_on_the_gpu(tmp_path):
    """The swapped blocks stay page-locked in CPU memory and stream over on the side stream, one block ahead."""
    cfg = TINY_DIT.__class__(**{**TINY_DIT.__dict__, "blocks": 4})
    path = write_single(random_dit_state(cfg, seed=3), tmp_path / "dit.safetensors", dtype=torch.float32)
    whole = load_dit(path, device="cuda", dtype=torch.bfloat16)
    swapped = load_dit(path, device="cuda", dtype=torch.bfloat16)
    swapped.swap_blocks(2)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in swapped.transformer_blocks[3].parameters())
    x, sigma, text, mask, grid = inputs("cuda")
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(swapped(x, sigma, text, mask, grid), whole(x, sigma, text, mask, grid))


def test_fused_norm_and_rope_matches_the_plain_pytorch_form_on_cuda():
    """comfy-kitchen's rms_rope (its CUDA or Triton kernel here) against the float32 PyTorch form compile uses."""
    from lens_core import DiTConfig
    from lens_core.dit.model import JointAttention
    from lens_core.dit.rope import apply_rope, rope_frequencies

    torch.manual_seed(0)
    attention = JointAttention(DiTConfig(hidden=128, heads=2)).cuda().bfloat16()
    for norm in (attention.norm_q, attention.norm_k, attention.norm_added_q, attention.norm_added_k):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    qkv = [torch.randn(2, 2, n, 64, device="cuda", dtype=torch.bfloat16) * 3 for n in (20, 20, 6, 6)]
    rope = rope_frequencies(4, 5, 6, (8, 28, 28), "cuda")
    q, k = attention._norm_and_rope(*qkv, rope)
    iq, ik, tq, tk = qkv
    expected_q = apply_rope(torch.cat([attention.norm_q(iq), attention.norm_added_q(tq)], dim=2), rope, torch.bfloat16)
    expected_k = apply_rope(torch.cat([attention.norm_k(ik), attention.norm_added_k(tk)], dim=2), rope, torch.bfloat16)
    for out, expected in ((q, expected_q), (k, expected_k)):
        assert (out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
