"""`load_text_encoder`: GPT-OSS-20B from Microsoft/OpenAI's MXFP4 HF folder, Comfy-Org's NVFP4 file,
plain bf16/fp32 weights, or a llama.cpp GGUF (gguf_loader.py). Expert banks stay packed (see experts.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..checkpoint.identify import find_key_prefix
from ..checkpoint.safetensors_reader import Checkpoint, open_component
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint, missing_numbers
from ..device import resolve_compute
from ..errors import LensFileError
from .experts import DenseBank, MXFP4Bank, NVFP4Bank, check_banks
from .gguf_loader import config_from_gguf, is_llama_cpp_layout, load_llama_cpp_encoder
from .gpt_oss import GptOssConfig, GptOssEncoder

_EXPECTED = (
    "the GPT-OSS-20B text encoder: Comfy-Org's gpt_oss_20b_nvfp4.safetensors (models/text_encoders) "
    "or Microsoft/OpenAI's text_encoder/ folder (model-0000k-of-00003.safetensors + config.json), "
    "or llama.cpp's gpt-oss-20b GGUF"
)


def _prefix(ckpt: Checkpoint) -> str:
    return find_key_prefix(ckpt, ("model.", ""), ("layers.0.self_attn.sinks",), "GPT-OSS", _EXPECTED)


def check_file(path: str | os.PathLike) -> None:
    """Raise LensFileError unless `path` holds GPT-OSS, from the file headers alone (no weights read)."""
    ckpt = open_component(path, "text_encoder", "model")
    if is_llama_cpp_layout(ckpt):
        config_from_gguf(ckpt)
    else:
        _prefix(ckpt)


_CONFIG_KEYS = ("embed_tokens.weight", "layers.0.self_attn.sinks", "layers.0.self_attn.q_proj.weight",
                "layers.0.self_attn.k_proj.weight", "layers.0.mlp.router.weight")


def _layer_ids(ckpt: Checkpoint, prefix: str) -> set[int]:
    return {int(m.group(1)) for k in ckpt.keys() if (m := re.match(re.escape(prefix) + r"layers\.(\d{1,9})\.", k))}


def _config_json(ckpt: Checkpoint) -> dict | None:
    first = Path(ckpt.files[0].path)
    candidate = first.parent / "config.json"
    if candidate.is_file():
        try:
            config = json.loads(candidate.read_bytes())
        except (UnicodeDecodeError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            raise LensFileError(f"{candidate}: this is not a JSON object, so it is not the model's config.json. "
                                "Download it again with the text encoder's other files.")
        if config.get("model_type", "gpt_oss") != "gpt_oss":
            raise LensFileError(f"{candidate}: model_type is {config.get('model_type')!r}, not gpt_oss. Expected {_EXPECTED}.")
        return config
    return None


def config_from(ckpt: Checkpoint, prefix: str, declared: dict | None) -> GptOssConfig:
    """From config.json (`declared`, either spelling of the RoPE and top-k fields), else from shapes and
    the GPT-OSS-20B constants."""
    def shape(name):
        return ckpt.shape(prefix + name)

    ckpt.require(prefix + key for key in _CONFIG_KEYS)
    layers = len(_layer_ids(ckpt, prefix))
    vocab, hidden = shape("embed_tokens.weight")
    heads = shape("layers.0.self_attn.sinks")[0]
    head_dim = shape("layers.0.self_attn.q_proj.weight")[0] // heads
    derived = dict(
        vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, head_dim=head_dim,
        kv_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
        experts=shape("layers.0.mlp.router.weight")[0],
        expert_hidden=ckpt.shape(_file_key(ckpt, prefix, "layers.0.mlp.gate_up_bias"))[1] // 2,
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)),
    )
    if declared is None:
        return GptOssConfig(**derived)
    rope = declared.get("rope_parameters") or {**(declared.get("rope_scaling") or {}), "rope_theta": declared.get("rope_theta")}
    defaults = GptOssConfig()
    if "layer_types" in declared:
        derived["layer_types"] = tuple(declared["layer_types"])
    return GptOssConfig(
        **derived,
        experts_per_token=declared.get("num_experts_per_tok", declared.get("experts_per_token", defaults.experts_per_token)),
        sliding_window=declared.get("sliding_window", defaults.sliding_window),
        rms_eps=declared.get("rms_norm_eps", defaults.rms_eps),
        rope_theta=rope.get("rope_theta") or defaults.rope_theta,
        rope_factor=rope.get("factor", defaults.rope_factor),
        rope_beta_fast=rope.get("beta_fast", defaults.rope_beta_fast),
        rope_beta_slow=rope.get("beta_slow", defaults.rope_beta_slow),
        rope_original_context=rope.get("original_max_position_embeddings", defaults.rope_original_context),
        rope_truncate=rope.get("truncate", defaults.rope_truncate),
        swiglu_limit=declared.get("swiglu_limit", defaults.swiglu_limit),
    )


def _bank(ckpt: Checkpoint, base: str, device) -> MXFP4Bank | NVFP4Bank | DenseBank:
    """The expert bank stored under `base` (e.g. `model.layers.3.mlp.experts.gate_up_proj`)."""
    if base + "_blocks" in ckpt:
        return MXFP4Bank(ckpt.read(base + "_blocks"), ckpt.read(base + "_scales")).to(device)
    if base + ".weight_scale" in ckpt:
        return NVFP4Bank(ckpt.read(base + ".weight"), ckpt.read(base + ".weight_scale"), ckpt.read(base + ".weight_scale_2")).to(device)
    if base + ".weight" in ckpt:
        return DenseBank(ckpt.read(base + ".weight"), transposed=False).to(device)
    if base in ckpt:
        return DenseBank(ckpt.read(base), transposed=True).to(device)
    raise LensFileError(f"{ckpt.name}: expert weights {base}* are missing. The file is incomplete: download it again.")


def _file_key(ckpt: Checkpoint, prefix: str, name: str) -> str:
    """The file key of a model parameter; expert biases are `*_proj_bias` (HF) or `*_proj.bias` (Comfy)."""
    for ours, theirs in ((".mlp.gate_up_bias", ".mlp.experts.gate_up_proj"), (".mlp.down_bias", ".mlp.experts.down_proj")):
        if name.endswith(ours):
            base = prefix + name[: -len(ours)] + theirs
            return base + "_bias" if base + "_bias" in ckpt else base + ".bias"
    return prefix + name


def load_text_encoder(path: str | os.PathLike, device=None, dtype=None) -> GptOssEncoder:
    """Load GPT-OSS for feature extraction. Defaults: CUDA + bf16 when available, else CPU + fp32.

    The token embedding keeps the file's dtype (a lookup table needs no upcast: saves ~1.2 GB on CPU) and stays in
    CPU memory on every device (only the looked-up rows go to the GPU).
    """
    device, dtype = resolve_compute(device, dtype, what="the Lens text encoder")
    ckpt = open_component(path, "text_encoder", "model")
    if is_llama_cpp_layout(ckpt):
        model = load_llama_cpp_encoder(ckpt, device, dtype)
        model.source, model.identity = ckpt.name, _identity(ckpt)
        return model
    prefix = _prefix(ckpt)
    declared = _config_json(ckpt)
    cfg = config_from(ckpt, prefix, declared)
    _check_layers(ckpt, prefix, cfg, declared)
    with torch.device("meta"):
        model = GptOssEncoder(cfg)
    file_key = {name: _file_key(ckpt, prefix, name) for name, _ in model.named_parameters()}
    file_keys = set(ckpt.keys())
    check_against_checkpoint(model, [n for n in file_key if file_key[n] in file_keys], lambda n: ckpt.shape(file_key[n]), ckpt.name)
    fill_from_checkpoint(model, lambda n, d: ckpt.read(file_key[n], d), device, dtype, dtype_for={"embed_tokens.weight": None},
                         device_for={"embed_tokens.weight": "cpu"})  # the encoder keeps it there (see GptOssEncoder.cpu_resident)
    for i, layer in enumerate(model.layers):
        base = f"{prefix}layers.{i}.mlp.experts."
        layer.mlp.gate_up, layer.mlp.down = _bank(ckpt, base + "gate_up_proj", device), _bank(ckpt, base + "down_proj", device)
    check_banks(model, ckpt.name)
    model.source = ckpt.name
    model.identity = _identity(ckpt)
    return model


def _check_layers(ckpt: Checkpoint, prefix: str, cfg: GptOssConfig, declared: dict | None) -> None:
    """Every layer must be there: as many as config.json says, or GPT-OSS-20B's 24 for its width."""
    if declared is not None:
        expected = declared.get("num_hidden_layers", cfg.layers)
        if not isinstance(expected, int) or isinstance(expected, bool) or expected < 1:
            raise LensFileError(f"{ckpt.name}: its config.json gives num_hidden_layers = {str(expected)[:40]}, not a "
                                "positive whole number. Download config.json again.")
    else:
        expected = GptOssConfig().layers if cfg.hidden == GptOssConfig().hidden else cfg.layers
    present = {i for i in _layer_ids(ckpt, prefix) if prefix + f"layers.{i}.self_attn.sinks" in ckpt}
    if len({i for i in present if i < expected}) < expected:
        raise LensFileError(f"{ckpt.name}: the model has {expected:,} layers, but {missing_numbers(present, expected)} "
                            "are missing. The file is incomplete (a missing shard?): download every file of the text "
                            "encoder again.")


def _identity(ckpt: Checkpoint) -> str:
    """Names this encoder's weights for the prompt cache: a hash of the files' content, so a fine-tune of the same
    size, or a file copied with its old modification time, never gets another encoder's features."""
    config = Path(ckpt.files[0].path).parent / "config.json"
    declared = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "-"
    return f"{ckpt.fingerprint()}:{declared}"
