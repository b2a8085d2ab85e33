"""fp8 weight storage and compiled blocks: smaller or faster, and still the same model."""

import pytest
import torch
from model_files import TINY_DIT, mxfp8_state, random_dit_state, write_single
from safetensors.torch import save_file

from lens_core import DiTConfig, LensDiT, LensInputError, apply_loras, load_dit
from lens_core.dit.loader import to_fp8_weights
from lens_core.placement import weight_bytes as model_bytes
from lens_core.quant import formats
from lens_core.quant.layers import PackedLinear


def packed_as(model, kind) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, PackedLinear) and isinstance(m.format, kind)}


def inputs(batch_mask=((True,) * 6, (True,) * 2 + (False,) * 4), grid=(4, 5)):
    torch.manual_seed(0)
    mask = torch.tensor(batch_mask)
    h, w = grid
    return (torch.randn(len(mask), h * w, 128), torch.full((len(mask),), 0.6), torch.randn(len(mask), 6, 4, 48) * mask[..., None, None],
            mask, grid)


def relative_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_single(random_dit_state(TINY_DIT, seed=7), tmp_path_factory.mktemp("fp8") / "dit.safetensors", dtype=torch.float32)


def test_real_size_fp8_model_takes_two_thirds_of_bf16():
    """Counted on the meta device at the real size: 0.667x (the modulation third of the weights stays bf16)."""
    with torch.device("meta"):
        bf16 = LensDiT(DiTConfig()).to(torch.bfloat16)
        full = model_bytes(bf16)
        fp8 = model_bytes(to_fp8_weights(bf16, fast=False))
    assert fp8 <= 0.7 * full and fp8 / full == pytest.approx(0.667, abs=0.005)


def test_fp8_weights_stay_close_to_fp32(dit_file):
    """Measured: relative L2 0.009 from the fp32 model (bf16 weights alone: 0.005); the bound is 0.10."""
    reference = load_dit(dit_file, device="cpu", dtype=torch.float32)
    fp8 = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    x, sigma, text, mask, grid = inputs()
    assert relative_l2(fp8(x, sigma, text, mask, grid), reference(x, sigma.bfloat16().float(), text, mask, grid)) <= 0.10
    quantised = packed_as(fp8, formats.FP8Rows)
    assert "transformer_blocks.0.attn.img_qkv" in quantised and "transformer_blocks.1.txt_mlp.w2" in quantised
    assert not any("_mod" in name for name in quantised) and "img_in" not in quantised


def test_modulation_and_top_level_layers_keep_the_compute_dtype(dit_file):
    fp8 = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    assert getattr(fp8.transformer_blocks[0].img_mod, "1").weight.dtype == torch.bfloat16
    assert fp8.img_in.weight.dtype == torch.bfloat16 and fp8.proj_out.weight.dtype == torch.bfloat16
    layer = fp8.transformer_blocks[0].attn.img_qkv
    assert layer.format is formats.fp8_rows(False) and layer.weight.dtype == torch.uint8 and layer.weight.shape == (384, 128)


def test_fast_fp8_falls_back_without_fp8_tensor_cores_and_its_matmul_is_right(dit_file, monkeypatch):
    slow = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    fast = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn_fast")
    assert torch.equal(fast(*inputs()), slow(*inputs()))  # a CPU has no fp8 tensor cores: same dequantised path
    layer = fast.transformer_blocks[0].attn.img_qkv
    x = torch.randn(2, 9, layer.in_features).bfloat16()
    reference = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32, "cpu"), layer.bias.float())
    monkeypatch.setattr(formats, "has_fp8_tensor_cores", lambda device: True)  # as on an RTX 4090 / H100
    fused = layer.format.linear(x, layer.parts("cpu"), layer.bias.bfloat16())
    assert fused is not None and relative_l2(fused, reference) <= 0.06  # activations in fp8 too


def test_mxfp8_files_convert_to_per_row_fp8(tmp_path):
    save_file(mxfp8_state(random_dit_state(TINY_DIT, seed=7)), str(tmp_path / "lens_mxfp8.safetensors"))
    mx = load_dit(tmp_path / "lens_mxfp8.safetensors", device="cpu", dtype=torch.bfloat16)
    fp8 = load_dit(tmp_path / "lens_mxfp8.safetensors", device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn_fast")
    assert packed_as(mx, formats.MXFP8)
    left = packed_as(fp8, formats.MXFP8)
    assert left and all("_mod" in name for name in left)  # the modulation stays as the file stores it
    assert relative_l2(fp8(*inputs()), mx(*inputs())) <= 0.05


def test_unknown_weight_dtype_is_refused(dit_file):
    with pytest.raises(LensInputError, match="weight_dtype 'int4' is not offered"):
        load_dit(dit_file, device="cpu", weight_dtype="int4")


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_reuse_the_graph_for_new_sizes(dit_file, tmp_path):
    """Compiled at the first forward, on the device the model runs on; later sizes and masks reuse the graphs the first
    batch-1 and padded batch-2 calls made."""
    from torch._dynamo.utils import counters

    eager = load_dit(dit_file, device="cpu", dtype=torch.float32)
    compiled = load_dit(dit_file, device="cpu", dtype=torch.float32, compile=True)
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled at load
    runs = ((((True,) * 6, (True,) * 2 + (False,) * 4), (4, 5)), (((True,) * 6,), (3, 5)), (((True,) * 6,), (6, 3)), (((True,) * 6,), (2, 7)),
            (((True,) * 6, (True,) * 3 + (False,) * 3), (5, 2)))
    for index, (batch_mask, grid) in enumerate(runs):
        args = inputs(batch_mask, grid)
        with torch.no_grad():
            assert torch.allclose(compiled(*args), eager(*args), atol=1e-4, rtol=1e-4)
        if index == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # new sizes and prompt masks: no recompilation
    lora = {"diffusion_model.transformer_blocks.0.attn.img_qkv.lora_down.weight": torch.randn(4, 128) * 0.1,
            "diffusion_model.transformer_blocks.0.attn.img_qkv.lora_up.weight": torch.randn(384, 4) * 0.1}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with torch.no_grad():
        expected = apply_loras(eager, [(tmp_path / "lora.safetensors", 1.0)])(*inputs())
        got = apply_loras(compiled, [(tmp_path / "lora.safetensors", 1.0)])(*inputs())
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4) and not torch.allclose(got, eager(*inputs()), atol=1e-3)


def test_sage_attention_without_its_package_is_refused_before_loading(dit_file, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sageattention", None)  # as on a machine without it
    with pytest.raises(LensInputError, match="attention 'sage' needs the sageattention package"):
        load_dit(dit_file, device="cpu", attention="sage")
    with pytest.raises(LensInputError, match="attention must be one of sdpa, sage"):
        load_dit(dit_file, device="cpu", attention="flash")


def test_fast_fp8_falls_back_once_when_the_gpu_refuses(dit_file, monkeypatch, caplog):
    import logging

    fast = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn_fast")
    slow = load_dit(dit_file, device="cpu", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Only rowwise scaling on sm90 is supported")

    monkeypatch.setattr(formats, "has_fp8_tensor_cores", lambda device: True)  # as on an RTX 4090 / H100
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    monkeypatch.setattr(formats, "_fp8_matmul_refused", False)
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        out = fast(*inputs())
    assert torch.equal(out, slow(*inputs())) and len(calls) == 1
    assert caplog.text.count("fp8 x fp8 matmuls are not available here") == 1
