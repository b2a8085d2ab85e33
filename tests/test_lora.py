"""LoRAs in the three published formats against a reference denoiser with the deltas merged into its weights."""

import logging

import pytest
import torch
from model_files import TINY_DIT, mxfp8_state, random_dit_state, write_single
from safetensors.torch import save_file

from lens_core import LensFileError, apply_loras, load_dit, load_lora
from lens_core.dit.lora import LoRALinear

# Layers a Lens LoRA trains: qkv, attention outputs, MLP, modulation in the blocks, and the top-level layers.
TARGETS = ["transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.attn.txt_qkv", "transformer_blocks.0.attn.to_out.0",
           "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.img_mlp.w1", "transformer_blocks.1.txt_mlp.w2",
           "transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1", "img_in", "txt_in",
           "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"]


def deltas(state, seed, rank=4, alpha=None):
    """{layer: (down [rank, in], up [out, rank], alpha or None)} for TARGETS, random but of a visible size."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in TARGETS:
        rows, cols = state[name + ".weight"].shape
        down = torch.randn(rank, cols, generator=generator) / cols ** 0.5
        up = torch.randn(rows, rank, generator=generator) * 0.3
        out[name] = (down, up, alpha)
    return out


def write_kohya(layers, path):
    """musubi-tuner / kohya: lora_unet_<path with underscores>.lora_down / lora_up / alpha."""
    tensors = {}
    for name, (down, up, alpha) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def write_diffusers(layers, path, prefix="transformer."):
    """diffusers / PEFT: <prefix><module>.lora_A / lora_B, no alpha (scale 1)."""
    save_file({f"{prefix}{name}.lora_{ab}.weight": t for name, (down, up, _) in layers.items() for ab, t in (("A", down), ("B", up))},
              str(path))
    return path


def write_comfy(layers, path):
    """ComfyUI: diffusion_model.<module>.lora_down / lora_up / alpha."""
    tensors = {}
    for name, (down, up, alpha) in layers.items():
        tensors |= {f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up}
        if alpha is not None:
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def merged(state, applied):
    """The reference: W + strength * (alpha / rank or 1) * up @ down, merged into a copy of the weights."""
    out = {k: v.clone() for k, v in state.items()}
    for layers, strength in applied:
        for name, (down, up, alpha) in layers.items():
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            out[name + ".weight"] += strength * scale * (up @ down)
    return out


def inputs():
    torch.manual_seed(3)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    return (torch.randn(2, 12, 128), torch.tensor([0.7, 0.3]), torch.randn(2, 5, 4, 48) * mask[..., None, None], mask, (3, 4))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    state = random_dit_state(TINY_DIT, seed=11)
    folder = tmp_path_factory.mktemp("lora")
    return state, load_dit(write_single(state, folder / "dit.safetensors", dtype=torch.float32), device="cpu"), folder


def reference_output(state, applied, tmp_path):
    return load_dit(write_single(merged(state, applied), tmp_path / "merged.safetensors", dtype=torch.float32), device="cpu")(*inputs())


def close(out, ref):
    return (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("fmt", ["kohya", "kohya_no_alpha", "diffusers", "peft", "comfy"])
def test_each_format_matches_merged_weights(base, tmp_path, fmt):
    state, dit, _ = base
    before = dit(*inputs())
    layers = deltas(state, seed=1, alpha=None if fmt in ("kohya_no_alpha", "diffusers", "peft") else 2.0)
    writer = {"kohya": write_kohya, "kohya_no_alpha": write_kohya, "diffusers": write_diffusers, "comfy": write_comfy,
              "peft": lambda layers, path: write_diffusers(layers, path, prefix="base_model.model.")}[fmt]
    path = writer(layers, tmp_path / f"{fmt}.safetensors")
    lora = load_lora(path, dit)
    assert sorted(lora.layers) == sorted(TARGETS) and not lora.unmatched
    out = apply_loras(dit, [(path, 0.8)])(*inputs())
    ref = reference_output(state, [(layers, 0.8)], tmp_path)
    assert close(out, ref) and not torch.allclose(out, before, atol=1e-2)
    assert torch.equal(dit(*inputs()), before)  # the base denoiser is untouched


def test_stacked_formats_with_strengths(base, tmp_path):
    state, dit, _ = base
    a, b, c = deltas(state, 1, alpha=2.0), deltas(state, 2, rank=2), deltas(state, 3, rank=8, alpha=4.0)
    files = [write_kohya(a, tmp_path / "a.safetensors"), write_diffusers(b, tmp_path / "b.safetensors"), write_comfy(c, tmp_path / "c.safetensors")]
    stacked = apply_loras(dit, list(zip(files, (0.8, -0.5, 1.5))))
    ref = reference_output(state, [(a, 0.8), (b, -0.5), (c, 1.5)], tmp_path)
    assert close(stacked(*inputs()), ref)
    chained = apply_loras(apply_loras(apply_loras(dit, [(files[0], 0.8)]), [(files[1], -0.5)]), [(files[2], 1.5)])
    assert close(chained(*inputs()), ref)


def test_loras_share_the_base_weights(base, tmp_path):
    state, dit, _ = base
    path = write_comfy(deltas(state, 1, alpha=2.0), tmp_path / "c.safetensors")
    patched = apply_loras(dit, [(path, 1.0)])
    qkv = patched.transformer_blocks[0].attn.img_qkv
    assert isinstance(qkv, LoRALinear) and qkv.base is dit.transformer_blocks[0].attn.img_qkv
    assert not isinstance(dit.transformer_blocks[0].attn.img_qkv, LoRALinear)
    base_ptrs = {p.data_ptr() for p in dit.parameters()}
    extra = [p for p in patched.parameters() if p.data_ptr() not in base_ptrs]
    assert sum(p.numel() for p in extra) == sum(d.numel() + u.numel() for d, u, _ in deltas(state, 1).values())
    assert apply_loras(dit, [(path, 0.0)])(*inputs()).equal(dit(*inputs()))


def test_lora_on_an_mxfp8_base(base, tmp_path):
    state, _, _ = base
    save_file(mxfp8_state(state), str(tmp_path / "mx.safetensors"))
    mx = load_dit(tmp_path / "mx.safetensors", device="cpu", dtype=torch.float32)
    layers = deltas(state, 4, alpha=2.0)
    path = write_kohya(layers, tmp_path / "k.safetensors")
    out = apply_loras(mx, [(path, 1.0)])(*inputs())
    dequantised = {k: v.bfloat16().float() for k, v in state.items()}  # what the file holds for unquantised layers
    for name, module in mx.named_modules():
        if hasattr(module, "dequantized_weight"):
            dequantised[name + ".weight"] = module.dequantized_weight(torch.float32)
    assert close(out, reference_output(dequantised, [(layers, 1.0)], tmp_path))


def test_a_lora_for_another_model_is_named(base, tmp_path):
    _, dit, _ = base
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4), "lora_te1_text_model_x.alpha": torch.tensor(4.0)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LensFileError, match=r"sdxl.safetensors matched none .* \(3 keys, 0 matched\): it looks like an SDXL / SD1.5 LoRA"):
        load_lora(tmp_path / "sdxl.safetensors", dit)
    flux = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(LensFileError, match="looks like a FLUX LoRA"):
        load_lora(tmp_path / "flux.safetensors", dit)
    qwen = {"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(4, 3072)}
    save_file(qwen, str(tmp_path / "qwen.safetensors"))
    with pytest.raises(LensFileError, match="looks like a Qwen-Image LoRA"):
        load_lora(tmp_path / "qwen.safetensors", dit)


def test_partly_matching_file_warns_and_bad_shapes_are_named(base, tmp_path, caplog):
    state, dit, _ = base
    layers = deltas(state, 5)
    tensors = {f"diffusion_model.{n}.lora_{ab}.weight": t for n, (d, u, _) in layers.items() for ab, t in (("down", d), ("up", u))}
    tensors["diffusion_model.some_other_layer.lora_down.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        lora = load_lora(tmp_path / "partial.safetensors", dit)
    assert len(lora.layers) == len(TARGETS) and "1 of 27 keys match no Lens layer" in caplog.text
    assert "diffusion_model.some_other_layer.lora_down.weight" in caplog.text
    wrong = {"diffusion_model.img_in.lora_down.weight": torch.zeros(4, 64), "diffusion_model.img_in.lora_up.weight": torch.zeros(128, 4)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LensFileError, match=r"layer img_in does not fit: the LoRA has down \[4, 64\] and up \[128, 4\], "
                                            r"the Lens layer maps 128 -> 128 features"):
        load_lora(tmp_path / "wrong.safetensors", dit)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LensFileError, match="broken.safetensors"):
        load_lora(tmp_path / "broken.safetensors", dit)


def test_a_model_file_given_as_a_lora_is_named(tmp_path):
    from te_files import hf_reference, write_comfy_nvfp4

    write_comfy_nvfp4(hf_reference()[0], tmp_path / "gpt_oss.safetensors")
    dit = load_dit(write_single(random_dit_state(), tmp_path / "d.safetensors"), device="cpu")
    with pytest.raises(LensFileError, match="not a LoRA file.*GPT-OSS.*belongs in the text-encoder slot"):
        load_lora(tmp_path / "gpt_oss.safetensors", dit)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_lora_values_and_strength_are_refused(tmp_path, alpha):
    from lens_core import LensInputError

    state = random_dit_state()
    dit = load_dit(write_single(state, tmp_path / "d.safetensors"), device="cpu")
    path = write_kohya(deltas(state, 0, alpha=alpha), tmp_path / "nan.safetensors")
    with pytest.raises(LensFileError, match="nan.safetensors: tensor .*alpha.* holds NaN or infinite values"):
        load_lora(path, dit)
    good = write_kohya(deltas(state, 0, alpha=4), tmp_path / "ok.safetensors")
    with pytest.raises(LensInputError, match="LoRA strength nan is not a finite number"):
        apply_loras(dit, [(good, float("nan"))])
