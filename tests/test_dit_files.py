"""load_dit on every published file layout, written small, and on files that are not a Lens DiT."""

import json

import pytest
import torch
from model_files import dequantised, mxfp8_state, random_dit_state, write_diffusers_shards, write_single
from safetensors.torch import save_file

from lens_core import LensFileError, load_dit
from lens_core.quant import formats
from lens_core.quant.layers import PackedLinear


@pytest.fixture(scope="module")
def state():
    return random_dit_state(seed=3)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return torch.randn(2, 12, 128), torch.tensor([0.9, 0.3]), torch.randn(2, 5, 4, 48) * mask[..., None, None], mask, (3, 4)


def run(path, inputs):
    return load_dit(path, device="cpu", dtype=torch.float32)(*inputs)


def test_bf16_file_bare_and_prefixed_are_identical(tmp_path, state, inputs):
    bare = run(write_single(state, tmp_path / "lens_bf16.safetensors"), inputs)
    prefixed = run(write_single(state, tmp_path / "combined.safetensors", prefix="model.diffusion_model."), inputs)
    assert torch.equal(bare, prefixed)


def test_fp32_shard_folder_matches_single_file(tmp_path, state, inputs):
    single = run(write_single(state, tmp_path / "one.safetensors", dtype=torch.float32), inputs)
    folder = write_diffusers_shards(state, tmp_path / "Lens" / "transformer")
    assert torch.equal(run(folder, inputs), single)
    assert torch.equal(run(tmp_path / "Lens", inputs), single)  # the repo folder finds transformer/


def test_one_shard_picked_in_a_dropdown_loads_its_whole_folder(tmp_path, state, inputs):
    """ComfyUI's model dropdowns list files, so a user of Microsoft's Lens-Base picks one shard of transformer/."""
    folder = write_diffusers_shards(state, tmp_path / "lens_base")
    whole = run(folder, inputs)
    for shard in sorted(folder.glob("*-of-*.safetensors")):
        assert torch.equal(run(shard, inputs), whole)
    from lens_core.checkpoint.source import model_files

    assert model_files(folder / "diffusion_pytorch_model-00001-of-00002.safetensors", "transformer", "diffusion_pytorch_model") == \
        model_files(folder, "transformer", "diffusion_pytorch_model")


def test_fp32_shards_convert_to_bf16_like_a_bf16_file(tmp_path, state, inputs):
    folder = write_diffusers_shards(state, tmp_path / "transformer")
    from_shards = load_dit(folder, device="cpu", dtype=torch.bfloat16)
    from_bf16 = load_dit(write_single(state, tmp_path / "b.safetensors"), device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in from_shards.parameters())
    assert torch.equal(from_shards(*inputs), from_bf16(*inputs))


def test_mxfp8_file_keeps_fp8_weights_and_matches_dequantised(tmp_path, state, inputs):
    mx = mxfp8_state(state)
    save_file(mx, str(tmp_path / "lens_mxfp8.safetensors"))
    dit = load_dit(tmp_path / "lens_mxfp8.safetensors", device="cpu", dtype=torch.float32)
    quantised = [m for m in dit.modules() if isinstance(m, PackedLinear) and m.format is formats.MXFP8_COMFY]
    assert len(quantised) == 2 * 2 * 6 - 2 * 2  # every block Linear but the two w2 (341 inputs)
    assert all(m.weight.dtype == torch.uint8 and m.weight.shape == (m.out_features, m.in_features) for m in quantised)  # fp8 codes
    reference = run(write_single(dequantised(mx), tmp_path / "deq.safetensors", dtype=torch.float32), inputs)
    assert torch.equal(dit(*inputs), reference)
    close_to_float = run(write_single(state, tmp_path / "f.safetensors", dtype=torch.float32), inputs)
    assert (reference - close_to_float).norm() / close_to_float.norm() < 0.1


def test_other_models_are_named(tmp_path, golden):
    with pytest.raises(LensFileError, match="FLUX.2 VAE.*not a Lens denoiser.*belongs in the VAE slot"):
        load_dit(golden / "vae_tiny_ldm.safetensors", device="cpu")
    with pytest.raises(LensFileError, match="GPT-OSS.*text encoder"):
        load_dit(golden / "te_tiny_mxfp4.safetensors", device="cpu")
    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux))
    with pytest.raises(LensFileError, match="FLUX-family.*expected a Lens denoiser|FLUX-family"):
        load_dit(flux, device="cpu")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "conditioner.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(LensFileError, match="SD1.x/SDXL"):
        load_dit(sdxl, device="cpu")


def test_truncated_file_is_refused(tmp_path, state):
    path = write_single(state, tmp_path / "lens_bf16.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LensFileError, match="truncated.*download it again"):
        load_dit(path, device="cpu")
    path.write_bytes(b"\x00garbage")
    with pytest.raises(LensFileError, match="empty or truncated|not a valid safetensors"):
        load_dit(path, device="cpu")


def test_missing_shard_is_named(tmp_path, state):
    folder = write_diffusers_shards(state, tmp_path / "transformer")
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LensFileError, match="00002-of-00002.safetensors is missing"):
        load_dit(folder, device="cpu")


def test_missing_weights_and_contradicting_shapes(tmp_path, state):
    partial = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.1.img_mlp")}
    with pytest.raises(LensFileError, match="3 weights are missing.*transformer_blocks.1.img_mlp"):
        load_dit(write_single(partial, tmp_path / "p.safetensors"), device="cpu")
    bad = dict(state, **{"transformer_blocks.1.attn.img_qkv.weight": torch.zeros(384, 64)})
    with pytest.raises(LensFileError, match=r"img_qkv.weight' has shape \[384, 64\].*imply \[384, 128\]"):
        load_dit(write_single(bad, tmp_path / "b.safetensors"), device="cpu")
    gap = {k.replace("transformer_blocks.1.", "transformer_blocks.2."): v for k, v in state.items()}
    with pytest.raises(LensFileError, match=r"blocks up to 2, but 1 of them \(1\) are missing"):
        load_dit(write_single(gap, tmp_path / "g.safetensors"), device="cpu")


def test_config_json_contradiction(tmp_path, state):
    folder = write_diffusers_shards(state, tmp_path / "transformer")
    (folder / "config.json").write_text(json.dumps({"num_layers": 48}))
    with pytest.raises(LensFileError, match="num_layers = 48.*have 2"):
        load_dit(folder, device="cpu")
