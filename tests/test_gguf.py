"""GGUF denoisers: every quantised type decodes exactly as llama.cpp's own Python library (`gguf`) decodes it, a
GGUF file loads with its Linear weights kept quantised and computes what the same model with the weights
dequantised by `gguf` computes; LoRA and block swap work on it; bad files get messages naming file and type.

One file comes from the real converter: tests/converted/lens_tiny_sd_cpp_mixed.gguf, made by stable-diffusion.cpp
(the converter of the published Lens GGUFs) with a tensor of every type. The others are written here with `gguf`'s
writer, with the state-dict names that ComfyUI-GGUF's converter keeps; quantised weights are quantised by `gguf` where
it can, else random blocks (valid scales, random packed values) of each type.
"""

import numpy as np
import pytest
import torch
from model_files import (
    QUANTISED_TYPES,
    SD_CPP_DIT,
    SD_CPP_FILE,
    dequantised_by_gguf,
    dit_inputs,
    finish_gguf,
    random_blocks,
    random_dit_state,
    write_gguf,
    write_single,
)

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's Python library) is the reference")
from gguf.quants import dequantize as reference_dequantize  # noqa: E402

from lens_core import DiTConfig, LensFileError, apply_loras, load_dit  # noqa: E402
from lens_core.quant import formats  # noqa: E402
from lens_core.quant.gguf_blocks import TYPES, decode_blocks  # noqa: E402
from lens_core.quant.layers import PackedLinear  # noqa: E402

QUANTISED = QUANTISED_TYPES


def dequantize(raw: torch.Tensor, qtype: int, shape, dtype=torch.float32) -> torch.Tensor:
    return decode_blocks(raw, qtype, dtype).reshape(shape)


def gguf_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, PackedLinear) and isinstance(m.format, formats.GGUFBlocks)]
GGUF_DIT = DiTConfig(hidden=256, heads=2, blocks=2, mlp_hidden=512, text_width=256, text_layers=4)


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda q: TYPES[q].name)
def test_every_quantised_type_decodes_bit_for_bit_as_llama_cpp_does(qtype):
    raw = random_blocks(qtype, 3, 2 * TYPES[qtype].values, np.random.default_rng(qtype))
    expected = reference_dequantize(raw, gguf.GGMLQuantizationType(qtype))
    got = dequantize(torch.from_numpy(raw), qtype, expected.shape)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected.astype(np.float32))
    assert dequantize(torch.from_numpy(raw).to("meta"), qtype, expected.shape).device.type == "meta"  # runs where the bytes are


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda q: TYPES[q].name)
def test_every_type_decodes_straight_into_bf16(qtype):
    """A bf16 model's weights are decoded in bf16: no float32 tensor of the weight's size is made on the way (every
    operation's output is recorded). The scale is rounded to bf16 before the multiply, so a value may differ from the
    float32 decode rounded to bf16 by a few bf16 steps of its row's largest value."""
    from model_files import Float32Outputs

    values = 2 * TYPES[qtype].values
    raw = torch.from_numpy(random_blocks(qtype, 4, values, np.random.default_rng(qtype)))
    exact = dequantize(raw, qtype, (4, values))
    with Float32Outputs() as recorded:
        bf16 = dequantize(raw, qtype, exact.shape, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and max(recorded.sizes, default=0) <= exact.numel() // 16  # per-sub-block scales at most
    assert ((bf16.float() - exact).abs() <= 3 * 2 ** -8 * exact.abs().amax(dim=-1, keepdim=True)).all()


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda q: TYPES[q].name)
def test_a_nan_scale_is_found_without_decoding(qtype):
    raw = random_blocks(qtype, 2, TYPES[qtype].values, np.random.default_rng(qtype))
    assert formats.gguf(qtype).finite({"weight": torch.from_numpy(raw)})
    blocks = raw.reshape(-1, TYPES[qtype].nbytes)
    if TYPES[qtype].scale_bytes:
        at = TYPES[qtype].scale_bytes[-1]
        blocks[1, at:at + 2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    else:
        blocks[1, 0] = 0xFF  # MXFP4's E8M0 NaN
    assert not formats.gguf(qtype).finite({"weight": torch.from_numpy(raw)})
    with np.errstate(all="ignore"):  # the reference computes with the NaN
        assert not np.isfinite(reference_dequantize(raw, gguf.GGMLQuantizationType(qtype))).all()


@pytest.mark.parametrize("qtype, np_dtype", [(0, np.float32), (1, np.float16)], ids=["F32", "F16"])
def test_float_types_read_as_they_are(qtype, np_dtype, tmp_path):
    values = np.random.default_rng(0).standard_normal((4, 8)).astype(np_dtype)
    writer = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "lens")
    writer.add_tensor("x", values)
    finish_gguf(writer)
    from lens_core.checkpoint.gguf_reader import GGUFFile

    file = GGUFFile(tmp_path / "f.gguf")
    assert file.packed_format("x") is None and torch.equal(file.read("x"), torch.from_numpy(values))
    assert torch.equal(file.read("x", torch.float32), torch.from_numpy(values.astype(np.float32)))


def inputs():
    return dit_inputs(GGUF_DIT.text_width)


@pytest.fixture(scope="module", params=[8, 12, 14], ids=["Q8_0", "Q4_K", "Q6_K"])
def gguf_dit(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    reference = write_gguf(folder / "lens.gguf", random_dit_state(GGUF_DIT, seed=1), request.param, np.random.default_rng(1))
    return folder / "lens.gguf", write_single(reference, folder / "dequantised.safetensors", dtype=torch.float32), request.param


def test_a_gguf_denoiser_stays_quantised_and_computes_as_its_dequantised_weights(gguf_dit):
    path, dequantised, qtype = gguf_dit
    model = load_dit(path, device="cpu", dtype=torch.float32)
    layers = gguf_layers(model)
    assert layers and all(m.weight.dtype == torch.uint8 and m.format.qtype == qtype for m in layers)
    quantised = sum(m.weight.numel() for m in layers)
    assert quantised == sum(m.in_features * m.out_features for m in layers) // TYPES[qtype].values * TYPES[qtype].nbytes
    reference = load_dit(dequantised, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = model(*inputs())
        assert out.isfinite().all() and out.std() > 0.01
        assert torch.allclose(out, reference(*inputs()), rtol=1e-5, atol=1e-6)


def test_a_denoiser_converted_by_stable_diffusion_cpp_computes_as_gguf_dequantises_it(tmp_path):
    """The real converter's output (tests/converted; tests/test_real_converters.py remakes it): its names, its
    choices of which tensors to quantise (1-D norm weights too), and one or more tensors of every type we decode."""
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(SD_CPP_FILE)).tensors}
    assert types == {block.name for block in TYPES.values()} | {"F32", "F16", "BF16"}
    model = load_dit(SD_CPP_FILE, device="cpu", dtype=torch.float32)
    assert len({m.format.qtype for m in gguf_layers(model)}) == 13  # all but the float types stay packed
    dense = load_dit(write_single(dequantised_by_gguf(SD_CPP_FILE), tmp_path / "dense.safetensors", dtype=torch.float32), device="cpu",
                     dtype=torch.float32)
    with torch.no_grad():
        out = model(*dit_inputs(SD_CPP_DIT.text_width))
        assert out.isfinite().all() and out.std() > 0.01
        assert torch.allclose(out, dense(*dit_inputs(SD_CPP_DIT.text_width)), rtol=1e-5, atol=1e-6)


def test_stable_diffusion_cpps_names_load_too(tmp_path):
    """stable-diffusion.cpp's converter keeps Lens's state-dict names under its `model.diffusion_model.` prefix."""
    state = {"model.diffusion_model." + name: t for name, t in random_dit_state(GGUF_DIT, seed=1).items()}
    reference = write_gguf(tmp_path / "lens-q4_K.gguf", state, 12, np.random.default_rng(4))
    model = load_dit(tmp_path / "lens-q4_K.gguf", device="cpu", dtype=torch.float32)
    dense = load_dit(write_single(reference, tmp_path / "dense.safetensors", dtype=torch.float32), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(*inputs()), dense(*inputs()), rtol=1e-5, atol=1e-6)


def test_loras_and_block_swap_work_on_a_gguf_denoiser(gguf_dit, tmp_path):
    from safetensors.torch import save_file

    path, dequantised, _ = gguf_dit
    hidden = GGUF_DIT.hidden
    lora = {f"diffusion_model.transformer_blocks.{i}.img_mlp.w1.lora_{p}.weight": torch.randn(s) * 0.1
            for i in (0, 1) for p, s in (("down", (4, hidden)), ("up", (GGUF_DIT.mlp_hidden, 4)))}
    save_file(lora, str(tmp_path / "l.safetensors"))
    model = load_dit(path, device="cpu", dtype=torch.float32)
    model.swap_blocks(1)
    patched = apply_loras(model, [(tmp_path / "l.safetensors", 0.8)])
    reference = apply_loras(load_dit(dequantised, device="cpu", dtype=torch.float32), [(tmp_path / "l.safetensors", 0.8)])
    assert isinstance(patched.transformer_blocks[0].img_mlp.w1.base, PackedLinear)  # beside the packed weight, not merged
    with torch.no_grad():
        assert torch.allclose(patched(*inputs()), reference(*inputs()), rtol=1e-5, atol=1e-6)


def test_a_gguf_of_another_model_is_named(tmp_path):
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "single_blocks.0.linear1.weight": torch.zeros(64, 32)}
    write_gguf(tmp_path / "flux.gguf", flux, 8, np.random.default_rng(0), architecture="flux")
    with pytest.raises(LensFileError, match=r"flux\.gguf.*FLUX"):
        load_dit(tmp_path / "flux.gguf", device="cpu")


def test_an_unsupported_type_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "lens")
    writer.add_tensor("img_in.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    finish_gguf(writer)
    with pytest.raises(LensFileError, match=r"iq2\.gguf: tensor 'img_in\.weight' is stored as IQ2_XXS, a type this pack does not decode"):
        load_dit(tmp_path / "iq2.gguf", device="cpu")


def test_a_truncated_or_renamed_file_says_so(gguf_dit, tmp_path):
    path, dequantised, _ = gguf_dit
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(LensFileError, match=r"cut\.gguf: the GGUF file is truncated or damaged"):
        load_dit(tmp_path / "cut.gguf", device="cpu")
    (tmp_path / "renamed.gguf").write_bytes(dequantised.read_bytes())
    with pytest.raises(LensFileError, match=r"renamed\.gguf: this is not a GGUF file"):
        load_dit(tmp_path / "renamed.gguf", device="cpu")


def test_the_loader_node_lists_gguf_files(tmp_path):
    """Outside ComfyUI the dropdowns list the models folder (tests/test_comfyui.py runs the GGUF workflow inside it)."""
    from pack import import_pack

    bridge = __import__(import_pack().__name__ + ".nodes.comfy_bridge", fromlist=["x"])
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "diffusion_models" / "lens_turbo-q8_0.gguf").symlink_to(SD_CPP_FILE)
    (tmp_path / "diffusion_models" / "folder.gguf").mkdir()  # a folder with a model's name is no file to offer
    bridge.set_models_dir(tmp_path)
    assert bridge.list_models("diffusion_models") == ["lens_turbo-q8_0.gguf"]


@pytest.mark.parametrize("fuse_gate_up,fuse_qkv", [(False, False), (True, False), (False, True)],
                         ids=["split", "gate_up_fused", "qkv_fused"])
def test_a_llama_cpp_gpt_oss_gguf_computes_what_transformers_computes(tmp_path, fuse_gate_up, fuse_qkv):
    """llama.cpp's names, metadata and MXFP4 block layout; the experts stay packed in GGUF blocks."""
    from te_files import hf_features, hf_reference, write_llama_cpp_gguf

    from lens_core import load_text_encoder
    from lens_core.quant.layers import PackedBank

    model, cfg = hf_reference(seed=6, top_k=3, window=4)
    write_llama_cpp_gguf(model, cfg, tmp_path / "gpt-oss-20b-mxfp4.gguf", fuse_gate_up=fuse_gate_up, fuse_qkv=fuse_qkv)
    encoder = load_text_encoder(tmp_path / "gpt-oss-20b-mxfp4.gguf", device="cpu")
    banks = [m for m in encoder.modules() if isinstance(m, PackedBank)]
    assert banks and all(b.weight.dtype == torch.uint8 and b.format.qtype == 39 for b in banks)
    assert (encoder.config.experts_per_token, encoder.config.sliding_window) == (3, 4)
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for ours, theirs in zip(encoder.features(ids, mask, (0, 1, 2)), hf_features(model, ids, mask, (0, 1, 2))):
        assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() <= 1e-4


def test_a_gguf_of_another_llm_is_named(tmp_path):
    from lens_core import load_text_encoder

    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        writer.add_tensor(name, np.zeros((8, 8), dtype=np.float32))
    finish_gguf(writer)
    with pytest.raises(LensFileError, match=r"llama\.gguf: this GGUF holds a 'llama' model, not GPT-OSS"):
        load_text_encoder(tmp_path / "llama.gguf", device="cpu")


def test_the_bundled_tokenizer_is_checked_against_a_gguf_vocabulary(tmp_path):
    from lens_core.text.tokenizer import HARMONY_SPECIAL_TOKENS, load_tokenizer

    def with_tokens(name, tokens):
        writer = gguf.GGUFWriter(str(tmp_path / name), "gpt-oss")
        writer.add_token_list(tokens)
        finish_gguf(writer)
        return tmp_path / name

    tokens = [f"t{i}" for i in range(201088)]
    for marker, index in HARMONY_SPECIAL_TOKENS.items():
        tokens[index] = marker
    assert load_tokenizer(with_tokens("gpt-oss.gguf", tokens)).encode("<|start|>") == [HARMONY_SPECIAL_TOKENS["<|start|>"]]
    expected = r"other\.gguf: its vocabulary has 't199998' at id 199998, where GPT-OSS's o200k_harmony has <\|startoftext\|>"
    with pytest.raises(LensFileError, match=expected):
        load_tokenizer(with_tokens("other.gguf", [f"t{i}" for i in range(201088)]))


@pytest.mark.slow
def test_compiled_blocks_of_a_gguf_denoiser_match_eager(tmp_path):
    """torch.compile traces the per-forward dequantisation with the rest of each block."""
    write_gguf(tmp_path / "lens.gguf", random_dit_state(GGUF_DIT, seed=2), 8, np.random.default_rng(5))
    eager = load_dit(tmp_path / "lens.gguf", device="cpu", dtype=torch.float32)
    compiled = load_dit(tmp_path / "lens.gguf", device="cpu", dtype=torch.float32, compile=True)
    with torch.no_grad():
        assert torch.allclose(compiled(*inputs()), eager(*inputs()), atol=1e-4, rtol=1e-4)


def test_decoding_on_a_gpu_copies_no_lookup_table_to_it_per_call(monkeypatch):
    """A table made from a Python list on a GPU is a blocking copy that would stall every layer's forward: each is
    made once per device. The meta device stands in for the GPU."""
    raws = {q: torch.from_numpy(random_blocks(q, 1, TYPES[q].values, np.random.default_rng(q))).to("meta") for q in QUANTISED}
    for qtype, raw in raws.items():
        dequantize(raw, qtype, (1, TYPES[qtype].values))
    real_tensor = torch.tensor

    def host_only(*args, device=None, **kwargs):
        assert device is None or torch.device(device).type == "cpu", "a tensor built from Python values on the GPU"
        return real_tensor(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "tensor", host_only)
    for qtype, raw in raws.items():
        assert dequantize(raw, qtype, (1, TYPES[qtype].values)).device.type == "meta"


def test_bf16_compute_and_fp8_storage_apply_to_a_gguf_denoiser(gguf_dit):
    """bf16 compute decodes straight into bf16 (one more rounding than the dense model's bf16 weights): its error
    against the float32 result stays within twice the dense bf16 model's. fp8 storage takes only the layers a file
    keeps unquantised (here none of the blocks' layers): the GGUF ones stay as they are."""
    path, dequantised, _ = gguf_dit
    with torch.no_grad():
        exact = load_dit(dequantised, device="cpu", dtype=torch.float32)(*inputs())
        bf16 = load_dit(path, device="cpu", dtype=torch.bfloat16)(*inputs()).float()
        dense_bf16 = load_dit(dequantised, device="cpu", dtype=torch.bfloat16)(*inputs()).float()
        assert (bf16 - exact).norm() <= 2 * (dense_bf16 - exact).norm()
        fp8 = load_dit(path, device="cpu", dtype=torch.float32, weight_dtype="fp8_e4m3fn")
        assert gguf_layers(fp8)
        assert torch.equal(fp8(*inputs()), load_dit(path, device="cpu", dtype=torch.float32)(*inputs()))


@pytest.mark.parametrize("qtype", [30, 1], ids=["BF16", "F16"])
def test_a_float_gguf_loads_as_plain_weights(tmp_path, qtype):
    """ComfyUI-GGUF's converter writes BF16 / F16 files first (llama.cpp's quantiser makes the smaller ones from them)."""
    reference = write_gguf(tmp_path / "lens-BF16.gguf", random_dit_state(GGUF_DIT, seed=3), qtype, np.random.default_rng(0))
    model = load_dit(tmp_path / "lens-BF16.gguf", device="cpu", dtype=torch.float32)
    assert not gguf_layers(model)
    dense = load_dit(write_single(reference, tmp_path / "dense.safetensors", dtype=torch.float32), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), dense(*inputs()))


def test_counts_and_sizes_read_from_a_damaged_header_are_checked_before_use(gguf_dit, tmp_path):
    """A header cut short, or claiming 2^60 tensors or a string of 2^60 bytes, gets a message (no huge allocation)."""
    import struct

    path, _, _ = gguf_dit
    data = path.read_bytes()
    cases = {"cut_header.gguf": data[:40],
             "many_tensors.gguf": data[:8] + struct.pack("<Q", 1 << 60) + data[16:],
             "long_key.gguf": data[:24] + struct.pack("<Q", 1 << 60) + data[32:]}
    for name, damaged in cases.items():
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(LensFileError, match=rf"{name}: the GGUF file is truncated or damaged"):
            load_dit(tmp_path / name, device="cpu")


def test_an_unchanged_gguf_is_parsed_once_and_a_replaced_one_again(gguf_dit, tmp_path):
    """Also when the new file has the old one's size and modification time (cp -p, rsync -a): what is served must be
    the new file's header, never the old one's."""
    import os

    from lens_core.checkpoint.gguf_reader import open_gguf

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf_dit[0].read_bytes())
    first = open_gguf(copy)
    assert open_gguf(copy) is first
    stat = copy.stat()
    changed = bytearray(copy.read_bytes())
    changed[-1] ^= 0xFF  # other data, same size
    replacement = tmp_path / "replacement.gguf"
    replacement.write_bytes(bytes(changed))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, copy)
    assert copy.stat().st_size == stat.st_size and copy.stat().st_mtime_ns == stat.st_mtime_ns
    assert open_gguf(copy) is not first


def test_a_text_encoder_gguf_in_the_denoiser_slot_is_named(tmp_path):
    from te_files import hf_reference, write_llama_cpp_gguf

    model, cfg = hf_reference(layers=2)
    write_llama_cpp_gguf(model, cfg, tmp_path / "gpt-oss.gguf")
    with pytest.raises(LensFileError, match=r"looks like a GPT-OSS language model .*text-encoder slot"):
        load_dit(tmp_path / "gpt-oss.gguf", device="cpu")
