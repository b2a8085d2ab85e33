"""Checks that need a CUDA GPU (marked `cuda`, skipped elsewhere): the GPU paths agree with the CPU reference,
and the example workflows run end to end with every model on the GPU."""

import pytest
import torch
from model_files import TINY_DIT, mxfp8_state, random_dit_state, write_single
from safetensors.torch import save_file
from te_files import expert_banks
from test_nodes import NODES, WORKFLOWS, image_source, shrink
from workflow_runner import NativeNodes, run_workflow

from lens_core import load_dit
from lens_core.dit.quant import MXFP8Linear

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
    assert any(isinstance(m, MXFP8Linear) for m in dit.modules())
    x, sigma, text, mask, grid = inputs("cuda")
    fast = dit(x, sigma, text, mask, grid).float()
    for module in dit.modules():  # force the dequantise-then-matmul path on the same weights
        if isinstance(module, MXFP8Linear):
            module.forward = lambda x, m=module: torch.nn.functional.linear(
                x, m.dequantized_weight(x.dtype), None if m.bias is None else m.bias.to(x.dtype))
    slow = dit(x, sigma, text, mask, grid).float()
    assert (fast - slow).norm() / slow.norm() < 0.05


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_the_gpu(workflow, models_dir, tmp_path, monkeypatch):
    """The nodes' models compute on CUDA, their LATENT / IMAGE outputs come back to the CPU."""
    import lens_core.sampling

    devices = []
    original = lens_core.sampling.sample

    def recording(dit, *args, **kwargs):
        devices.append(dit.device.type)
        return original(dit, *args, **kwargs)

    sampler_module = __import__(NODES["LensPackSampler"].__module__, fromlist=["x"])
    monkeypatch.setattr(sampler_module, "sample", recording)
    natives = NativeNodes(image_source)
    run_workflow(shrink(workflow, tmp_path, 5), NODES, natives)
    (images,) = natives.saved
    assert devices == ["cuda"] and images.device.type == "cpu" and torch.isfinite(images).all()


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


def test_streamed_weights_are_page_locked_and_copy_asynchronously():
    from lens_core.memory import pinned

    originals = [torch.randn(1000, 1000).bfloat16(), torch.arange(10)]
    pool = pinned.Pool(originals)
    copies = [pool.empty_like(t).copy_(t) for t in originals]
    assert all(t.is_pinned() for t in copies)
    on_gpu = [t.to("cuda", non_blocking=True) for t in copies]
    torch.cuda.synchronize()
    assert all(torch.equal(c.cpu(), t) for c, t in zip(on_gpu, originals))


def travelling_weights(dit, encoder):
    """What goes to the GPU and back: everything but the text encoder's token embedding, which stays in CPU memory."""
    return [*dit.parameters(), *dit.buffers(), *(w for name, w in encoder.named_parameters() if not name.startswith("embed_tokens.")),
            *encoder.buffers()]


def test_models_taking_turns_keep_page_locked_cpu_copies():
    """The first move back from the GPU lands in page-locked copies; later moves up copy from them, moves down copy
    nothing (the same CPU memory every time), and the results stay the same. A plain `.to("cpu")` frees the GPU
    memory too, and a collected model gives its page-locked memory back."""
    import gc

    from lens_core.demo import demo_dit, demo_text_encoder
    from lens_core.memory import pinned

    dit, encoder = demo_dit(), demo_text_encoder()
    torch.manual_seed(0)
    dit_inputs = (torch.randn(1, 20, 128), torch.tensor([0.6]), torch.randn(1, 6, 4, 64), None, (4, 5))
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        before, features = dit(*dit_inputs), encoder.features(ids, layers=(2, 5))

    for model in (dit, encoder):
        model.move("cuda")
        model.move("cpu")
    assert all(w.is_pinned() for w in travelling_weights(dit, encoder))
    pointers = [w.data_ptr() for w in travelling_weights(dit, encoder)]
    for model in (dit, encoder):
        model.move("cuda")
    assert all(w.device.type == "cuda" for w in [*dit.parameters(), *expert_banks(encoder)[0].buffers()])
    with torch.no_grad():
        on_gpu = dit(*dit_inputs).cpu(), [f.cpu() for f in encoder.features(ids, layers=(2, 5))]
    for model in (dit, encoder):
        model.move("cpu")
    assert [w.data_ptr() for w in travelling_weights(dit, encoder)] == pointers
    assert (on_gpu[0] - before).norm() / before.norm() < 1e-3
    assert all((a - b).norm() / b.norm() < 1e-3 for a, b in zip(on_gpu[1], features))
    with torch.no_grad():
        assert torch.equal(dit(*dit_inputs), before) and all(map(torch.equal, encoder.features(ids, layers=(2, 5)), features))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    dit.move("cuda")
    dit.to("cpu")  # not the pack's mover: nothing of the GPU copy may stay referenced
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == held
    used = pinned.provider.used
    del dit, encoder
    gc.collect()
    assert pinned.provider.used < used


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
