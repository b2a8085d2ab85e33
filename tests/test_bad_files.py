"""Broken and hostile model files: every one ends in a LensFileError naming the file, quickly and in bounded memory."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_files import random_dit_state, write_single
from safetensors.torch import load_file, save_file
from te_files import golden_te_folder, hf_reference, write_comfy_nvfp4

from lens_core import LensFileError, load_dit, load_text_encoder, load_vae
from lens_core.checkpoint.safetensors_reader import SafetensorsFile


def raw_file(path, header, data: bytes = b"") -> str:
    """A file in safetensors framing with any header (bytes, or a value written as JSON)."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture(scope="module")
def dit_state():
    return random_dit_state()


@pytest.mark.parametrize("header,complaint", [
    ([], "JSON list, not a map"),
    (None, "JSON NoneType, not a map"),
    (3, "JSON int, not a map"),
    ({"a": []}, "broken header entry"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "broken header entry"),
    ({"a": entry(offsets=(8, 0))}, "data_offsets are not"),
    ({"a": entry(offsets=(-8, 0))}, "data_offsets are not"),
    ({"a": entry(offsets=(0, 8, 1))}, "data_offsets are not"),
    ({"a": entry(shape=(3,))}, "needs 12 bytes, its offsets hold 8"),
    ({"a": entry(shape=(-2,))}, "shape is not a list"),
    ({"a": entry(shape=(2.0,))}, "shape is not a list"),
    ({"a": entry(shape=(True, 2))}, "shape is not a list"),
    ({"a": entry(shape=(1 << 62, 1 << 62))}, "its offsets hold 8"),
    ({"a": entry(dtype=["F32"])}, "cannot read"),
    ({"a": entry(), "b": entry("U8", (4,), (4, 8))}, "overlap"),
    ({"a": entry(offsets=(8, 16))}, "truncated"),
    ({"__metadata__": ["x"], "a": entry()}, "metadata is not a map"),
    (b'{"a": ' * 100_000, "corrupt"),
    (b'{"a": {}, "a": {}}', "appears more than once"),
    (b'\xff\xfe{}', "corrupt"),
])
def test_malformed_headers_name_the_file(tmp_path, header, complaint):
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(8))
    with pytest.raises(LensFileError, match=complaint) as caught:
        SafetensorsFile(path)
    assert str(caught.value).startswith(path) and len(str(caught.value)) < 500


def test_a_valid_header_still_reads(tmp_path):
    path = raw_file(tmp_path / "ok.safetensors", {"a": entry(), "__metadata__": {"k": "v"}},
                    struct.pack("<2f", 1.5, -2.0))
    file = SafetensorsFile(path)
    assert file.metadata == {"k": "v"} and file.read("a").tolist() == [1.5, -2.0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12),
       data=st.binary(max_size=64))
def test_fuzzed_headers_either_load_or_raise_lens_file_error(tmp_path, header, data):
    path = raw_file(tmp_path / "fuzz.safetensors", header, data)
    try:
        file = SafetensorsFile(path)
    except LensFileError:
        return
    for name in file.keys():
        file.read(name)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_entries_either_load_or_raise_lens_file_error(tmp_path, data):
    count = st.integers(-4, 40)
    header = {data.draw(st.text(max_size=4)): {
        "dtype": data.draw(st.sampled_from(["F32", "BF16", "U8", "F8_E4M3", "Q4", ""])),
        "shape": data.draw(st.lists(count, max_size=3)),
        "data_offsets": data.draw(st.lists(count, min_size=1, max_size=3)),
    } for _ in range(data.draw(st.integers(1, 3)))}
    path = raw_file(tmp_path / "fuzz.safetensors", header, bytes(data.draw(st.integers(0, 48))))
    try:
        file = SafetensorsFile(path)
    except LensFileError:
        return
    for name in file.keys():
        assert file.read(name).numel() == torch.Size(file.tensors[name].shape).numel()


def test_a_huge_block_number_costs_nothing(tmp_path, dit_state):
    """One extra key naming block 100000000 once drove the loader to 9 GB and a 89 MB message."""
    state = dict(dit_state, **{"transformer_blocks.100000000.pad": torch.zeros(1)})
    with pytest.raises(LensFileError, match=r"up to 100000000, but 99,999,998 of them \(2, 3, 4, 5, 6, \.\.\.\)") as caught:
        load_dit(write_single(state, tmp_path / "d.safetensors"), device="cpu")
    assert len(str(caught.value)) < 400


def test_a_huge_layer_count_in_config_json_costs_nothing_and_is_blamed_on_the_config(golden, tmp_path):
    """A count no model has is the config's fault; a count the weights do not reach may be a missing shard or the
    config: the message says both."""
    folder = golden_te_folder(golden, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=10_000_000)))
    with pytest.raises(LensFileError, match=r"config\.json: num_hidden_layers is 10000000, not a whole number between 1 and 65536") as caught:
        load_text_encoder(folder, device="cpu")
    assert len(str(caught.value)) < 400
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=60_000)))
    with pytest.raises(LensFileError, match=r"says 60,000 layers, but 59,99\d of them .* are missing .*or config\.json is damaged"):
        load_text_encoder(folder, device="cpu")
    for bad in ("1e7", "[1]", "null", "{"):
        (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=json.loads(bad)))
                                            if bad != "{" else bad)
        with pytest.raises(LensFileError, match="num_hidden_layers|not a JSON object"):
            load_text_encoder(folder, device="cpu")


def test_a_config_json_that_counts_fewer_layers_than_the_weights_hold_is_refused(golden, tmp_path):
    """transformers would build the fewer layers and drop the rest; the features come from layers that would not exist."""
    folder = golden_te_folder(golden, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(LensFileError, match=r"config\.json says 1 layers, but the weights beside it hold 6\. The folder mixes"):
        load_text_encoder(folder, device="cpu")


def test_denoiser_config_json_that_is_not_an_object(tmp_path, dit_state):
    from model_files import write_diffusers_shards

    folder = write_diffusers_shards(dit_state, tmp_path / "transformer")
    for text in ("[1, 2]", "not json", '"x"'):
        (folder / "config.json").write_text(text)
        with pytest.raises(LensFileError, match="config.json: this is not a JSON object"):
            load_dit(folder, device="cpu")


@pytest.mark.parametrize("key", ["img_in.weight", "proj_out.weight", "txt_norm.0.weight"])
def test_denoiser_missing_a_top_level_weight(tmp_path, dit_state, key):
    partial = {k: v for k, v in dit_state.items() if k != key}
    path = write_single(partial, tmp_path / "d.safetensors")
    with pytest.raises(LensFileError, match=rf"looks like a Lens denoiser.*1 of its weights is missing \({key}\)"):
        load_dit(path, device="cpu")


def test_text_encoder_missing_weights(tmp_path):
    model, _ = hf_reference()
    path = tmp_path / "te.safetensors"
    write_comfy_nvfp4(model, path)
    state = load_file(str(path))
    for key in ("embed_tokens.weight", "layers.1.mlp.experts.down_proj.weight_scale_2"):
        save_file({k: v for k, v in state.items() if k != key}, str(path))
        with pytest.raises(LensFileError, match=rf"looks like a GPT-OSS.*missing \({key}\)"):
            load_text_encoder(path, device="cpu")


def test_vae_missing_weights(golden, tmp_path):
    state = load_file(str(golden / "vae_tiny_ldm.safetensors"))
    path = tmp_path / "vae.safetensors"
    for key in ("encoder.down.1.block.0.conv1.weight", "decoder.up.0.block.0.conv2.weight", "bn.running_var"):
        save_file({k: v for k, v in state.items() if k != key}, str(path))
        with pytest.raises(LensFileError, match=rf"missing \({key}\)") as caught:
            load_vae(path, device="cpu")
        assert "belongs in" not in str(caught.value)


def test_bad_quantisation_marker_and_embedded_tokenizer(tmp_path, dit_state):
    from lens_core.text.tokenizer import load_tokenizer

    state = dict(dit_state, **{"transformer_blocks.0.img_mlp.w1.comfy_quant": torch.tensor([0xff, 0xfe], dtype=torch.uint8)})
    with pytest.raises(LensFileError, match="w1.comfy_quant': this is not a JSON object, so it is not the model's quantisation marker"):
        load_dit(write_single(state, tmp_path / "q.safetensors"), device="cpu")
    save_file({"tokenizer_json": torch.tensor([0xff, 0x00], dtype=torch.uint8)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(LensFileError, match="tokenizer_json is not UTF-8"):
        load_tokenizer(tmp_path / "te.safetensors")


def test_names_of_any_length_give_messages_of_a_few_hundred_characters(tmp_path, dit_state, caplog):
    """A 100 KB tensor name or architecture string is quoted cut short, in errors and in the LoRA loader's log."""
    import gguf
    import numpy as np
    from model_files import finish_gguf

    from lens_core.dit.lora import load_lora

    path = tmp_path / "long.gguf"
    writer = gguf.GGUFWriter(str(path), "a" * 100_000)
    writer.add_tensor("b" * 100_000, np.zeros(4, dtype=np.float32))
    finish_gguf(writer)
    for load in (load_dit, load_text_encoder):
        with pytest.raises(LensFileError) as caught:
            load(path, device="cpu")
        assert len(str(caught.value)) < 600
    dit = load_dit(write_single(dit_state, tmp_path / "d.safetensors"), device="cpu")
    lora = {"diffusion_model.img_in.lora_down.weight": torch.zeros(2, 128),
            "diffusion_model.img_in.lora_up.weight": torch.zeros(dit.img_in.out_features, 2)}
    lora |= {"c" * 100_000 + f"{i}.lora_down.weight": torch.zeros(1, 1) for i in range(3)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    load_lora(tmp_path / "lora.safetensors", dit)
    assert caplog.messages and max(len(m) for m in caplog.messages) < 1000


def _small_gguf(path) -> bytes:
    """A valid GGUF with metadata of several types and tensors of three storage types; returns its bytes."""
    import gguf
    import numpy as np
    from model_files import finish_gguf, random_blocks

    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    writer.add_block_count(3)
    writer.add_rope_freq_base(150000.0)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("f32", np.arange(8, dtype=np.float32))
    writer.add_tensor("f16", np.arange(64, dtype=np.float16).reshape(2, 32))
    writer.add_tensor("q8", random_blocks(8, 2, 64, np.random.default_rng(0)), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    finish_gguf(writer)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_gguf_files_either_load_or_raise_lens_file_error(tmp_path, data):
    """Any bytes changed anywhere in the header (counts, lengths, types, shapes, offsets), or the file cut short: the
    parser and every read either work or raise LensFileError, and nothing read is larger than the file."""
    from lens_core.checkpoint.gguf_reader import open_gguf

    path = tmp_path / "fuzz.gguf"
    original = _small_gguf(path)
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, 400))] = data.draw(st.integers(0, 255))
    damaged = damaged[:data.draw(st.integers(0, len(damaged)))] if data.draw(st.booleans()) else damaged
    path.write_bytes(bytes(damaged))
    try:
        file = open_gguf(path)
        for name in file.keys():
            assert file.raw(name).numel() <= len(damaged)
            file.read(name, torch.float32)
    except LensFileError:
        pass


_CONFIG_VALUES = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=4) | st.lists(st.integers(0, 3), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["num_hidden_layers", "num_experts_per_tok", "sliding_window", "rms_norm_eps",
                                               "swiglu_limit", "rope_parameters", "layer_types", "model_type",
                                               "rope_scaling", "rope_theta"]),
                              _CONFIG_VALUES | st.dictionaries(st.sampled_from(["rope_theta", "factor", "beta_fast", "truncate"]),
                                                               _CONFIG_VALUES, max_size=3), min_size=1, max_size=4))
def test_fuzzed_text_encoder_configs_either_load_or_raise_lens_file_error(golden, tmp_path_factory, fields):
    folder = golden_te_folder(golden, tmp_path_factory.mktemp("te"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    try:
        load_text_encoder(folder, device="cpu")
    except LensFileError:
        pass


def test_a_gguf_tensor_with_no_values_is_refused(tmp_path):
    """Found by the fuzz test above: a shape byte changed to 0 made decoding fail with a reshape error."""
    import gguf
    import numpy as np
    from model_files import finish_gguf

    from lens_core.checkpoint.gguf_reader import open_gguf

    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "lens")
    writer.add_tensor("q8", np.zeros((1, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    finish_gguf(writer)
    data = path.read_bytes()
    dims = data.index(b"q8") + 2 + 4  # the name, then n_dims (u32), then the dims (u64 each, innermost first)
    assert struct.unpack_from("<QQ", data, dims) == (32, 1)
    path.write_bytes(data[:dims + 8] + struct.pack("<Q", 0) + data[dims + 16:])
    with pytest.raises(LensFileError, match=r"empty.gguf: tensor 'q8' has shape \[0, 32\], with no values"):
        open_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_rope_settings_that_are_not_an_object_are_refused(golden, tmp_path, field):
    """Found by the fuzz test above: `"rope_scaling": true` ended in a TypeError."""
    folder = golden_te_folder(golden, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rope_parameters": None, field: True}))
    with pytest.raises(LensFileError, match=f"config.json: {field} is True, not an object"):
        load_text_encoder(folder, device="cpu")
