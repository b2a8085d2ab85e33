"""GPT-OSS feature extraction: golden MXFP4 model, transformers' GptOssModel, NVFP4 and dense files."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from te_files import dequantize_mxfp4, golden_te_folder, hf_features, hf_reference, write_comfy_nvfp4, write_hf_dense

from lens_core import LensFileError, load_text_encoder
from lens_core.quant import formats
from lens_core.quant.layers import PackedBank


def test_golden_mxfp4_features(golden, tmp_path):
    te = load_text_encoder(golden_te_folder(golden, tmp_path), device="cpu")
    bank = te.layers[0].mlp.gate_up
    assert isinstance(bank, PackedBank) and bank.format is formats.MXFP4_HF and bank.weight.dtype == torch.uint8  # stays packed
    assert te.config.experts_per_token == 2  # read from config.json, not assumed
    cases = load_file(str(golden / "te_tiny_cases.safetensors"))
    features = te.features(cases["ids"], cases["attention_mask"], layers=(1, 3, 4))
    for layer, got in zip((1, 3, 4), features):
        assert (got - cases[f"layer{layer}"]).abs().max() <= 1e-4, layer


def test_mxfp4_dequantiser_matches_transformers(golden):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(str(golden / "te_tiny_mxfp4.safetensors"))
    blocks, scales = state["model.layers.2.mlp.experts.down_proj_blocks"], state["model.layers.2.mlp.experts.down_proj_scales"]
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales), reference.transpose(1, 2))


@pytest.mark.parametrize("seed,layers,experts,top_k,window,lengths", [
    (0, 3, 6, 3, 3, [11, 7]),    # batch padding, window shorter than the sequence, 3 experts per token
    (1, 4, 4, 1, 2, [9, 9, 4]),  # one expert per token, window 2
    (2, 2, 8, 4, 16, [13]),      # window longer than the sequence
])
def test_matches_transformers_gpt_oss(tmp_path, seed, layers, experts, top_k, window, lengths):
    model, cfg = hf_reference(seed, layers, experts, top_k, window)
    te = load_text_encoder(write_hf_dense(model, cfg, tmp_path / "te"), device="cpu")
    torch.manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(0, 300, (len(lengths), s))
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 299)
    selected = tuple(range(layers))
    ours, theirs = te.features(ids, mask, selected), hf_features(model, ids, mask, selected)
    for layer, a, b in zip(selected, ours, theirs):
        real = mask.bool()
        assert (a[real] - b[real]).abs().max() <= 1e-4, layer


def test_early_exit_runs_only_needed_layers(tmp_path):
    model, cfg = hf_reference(layers=4)
    te = load_text_encoder(write_hf_dense(model, cfg, tmp_path / "te"), device="cpu")
    ran = []
    for i, layer in enumerate(te.layers):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    te.features(torch.tensor([[1, 2, 3]]), layers=(0, 1))
    assert ran == [0, 1]


def test_nvfp4_comfy_file_matches_its_dequantised_weights(tmp_path):
    # The Comfy file carries no config.json: window and top-k come from the GPT-OSS-20B constants.
    model, cfg = hf_reference(seed=4, top_k=4, window=128)
    dequantised = write_comfy_nvfp4(model, tmp_path / "gpt_oss_nvfp4.safetensors")
    te = load_text_encoder(tmp_path / "gpt_oss_nvfp4.safetensors", device="cpu")
    assert isinstance(te.layers[0].mlp.down, PackedBank) and te.layers[0].mlp.down.format is formats.NVFP4_COMFY
    assert te.layers[0].mlp.down.weight.dtype == torch.uint8
    assert (te.config.experts_per_token, te.config.sliding_window) == (4, 128)
    model.load_state_dict(dequantised)
    ids = torch.randint(0, 300, (1, 10))
    mask = torch.ones_like(ids)
    ours, theirs = te.features(ids, mask, (0, 1, 2)), hf_features(model, ids, mask, (0, 1, 2))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-4


def test_bf16_file_close_to_fp32(tmp_path):
    model, cfg = hf_reference(seed=5)
    te32 = load_text_encoder(write_hf_dense(model, cfg, tmp_path / "a"), device="cpu")
    te16 = load_text_encoder(write_hf_dense(model, cfg, tmp_path / "b", dtype=torch.bfloat16), device="cpu")
    assert te16.embed_tokens.weight.dtype == torch.bfloat16  # the lookup table keeps the file dtype
    ids = torch.randint(0, 300, (2, 8))
    for a, b in zip(te32.features(ids, layers=(0, 2)), te16.features(ids, layers=(0, 2))):
        assert (a - b).norm() / a.norm() < 0.02


def test_wrong_files_are_named(golden, tmp_path):
    with pytest.raises(LensFileError, match="Lens denoiser.*not GPT-OSS.*belongs in the denoiser slot"):
        load_text_encoder(golden / "dit_tiny.safetensors", device="cpu")
    with pytest.raises(LensFileError, match="FLUX.2 VAE.*not GPT-OSS.*belongs in the VAE slot"):
        load_text_encoder(golden / "vae_tiny_ldm.safetensors", device="cpu")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2), "model.embed_tokens.weight": torch.zeros(3, 2)},
              str(tmp_path / "llama.safetensors"))
    with pytest.raises(LensFileError, match="another family.*not GPT-OSS"):
        load_text_encoder(tmp_path / "llama.safetensors", device="cpu")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2), "model.layers.0.self_attn.q_norm.weight": torch.zeros(2),
               "model.embed_tokens.weight": torch.zeros(3, 2)}, str(tmp_path / "qwen3.safetensors"))
    with pytest.raises(LensFileError, match="Qwen3-style"):
        load_text_encoder(tmp_path / "qwen3.safetensors", device="cpu")


def test_missing_shard_is_named(golden, tmp_path):
    folder = golden_te_folder(golden, tmp_path)
    state = load_file(str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model-00001-of-00001.safetensors").unlink()
    first = {k: v for k, v in state.items() if ".layers.4." not in k and ".layers.5." not in k}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {k: "model-00002-of-00002.safetensors" for k in state if k not in first}
    import json
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LensFileError, match="model-00002-of-00002.safetensors is missing"):
        load_text_encoder(folder, device="cpu")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(LensFileError, match=r"6 layers, but 2 of them \(4, 5\) are missing"):
        load_text_encoder(folder, device="cpu")


def test_both_config_spellings_give_the_same_model(tmp_path):
    """transformers 5 writes rope_parameters + num_experts_per_tok; older files rope_scaling + rope_theta
    (+ experts_per_token in OpenAI's own config)."""
    import json

    model, cfg = hf_reference(seed=6, top_k=2)
    new = write_hf_dense(model, cfg, tmp_path / "new")
    old = write_hf_dense(model, cfg, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["experts_per_token"] = config.pop("num_experts_per_tok")
    (old / "config.json").write_text(json.dumps(config))
    te_new, te_old = load_text_encoder(new, device="cpu"), load_text_encoder(old, device="cpu")
    assert te_new.config == te_old.config and te_old.config.experts_per_token == 2
    ids = torch.randint(0, 300, (1, 9))
    assert torch.equal(te_new.features(ids, layers=(2,))[0], te_old.features(ids, layers=(2,))[0])


def test_an_expert_bank_of_another_size_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = hf_reference(seed=4, top_k=4, window=128)
    write_comfy_nvfp4(model, tmp_path / "fine.safetensors")
    state = load_file(str(tmp_path / "fine.safetensors"))
    state["layers.1.mlp.experts.down_proj.weight"] = torch.cat([state["layers.1.mlp.experts.down_proj.weight"]] * 2, dim=-1)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(LensFileError, match=r"odd\.safetensors: weight 'layers\.1\.mlp\.down\.weight' has shape \[\d+, \d+, \d+\], but the "
                                            r"other weights in the file imply"):
        load_text_encoder(tmp_path / "odd.safetensors", device="cpu")
