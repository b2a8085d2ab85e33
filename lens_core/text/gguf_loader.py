"""GPT-OSS-20B from a llama.cpp GGUF file (llama.cpp's own MXFP4 file, or other quantisations such as unsloth's).

llama.cpp's converter renames every tensor (`token_embd`, `blk.N.attn_q`, `blk.N.attn_sinks`, `blk.N.ffn_gate_inp`
for the router, ...), splits the fused gate_up experts into `ffn_gate_exps` and `ffn_up_exps` (or keeps them as one
`ffn_gate_up_exps`, gate rows first) and writes the config as metadata (`gpt-oss.block_count`, ...). Here the
names are mapped back, the experts stay packed in the file's block format (text/experts.GGUFBank, decoded per
routed expert as with the other formats), and the other tensors are read in the file's type and converted.
"""

from __future__ import annotations

import re

import torch

from ..checkpoint.safetensors_reader import Checkpoint
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint
from ..errors import LensFileError
from .experts import DenseBank, GGUFBank, InterleavedBank, check_banks
from .gpt_oss import GptOssConfig, GptOssEncoder

ARCH = "gpt-oss"
_LAYER_NAMES = {  # ours, under layers.N. -> llama.cpp's, under blk.N.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{q}.{kind}" for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
       for kind in ("weight", "bias")},
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
    "mlp.down_bias": "ffn_down_exps.bias",
}


def is_llama_cpp_layout(ckpt: Checkpoint) -> bool:
    return "token_embd.weight" in ckpt and "blk.0.attn_q.weight" in ckpt


def _file_key(name: str) -> str | None:
    """llama.cpp's key of one of our parameters (None for the fused gate/up bias, which is assembled)."""
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    theirs = _LAYER_NAMES.get(match.group(2)) if match else None
    return None if theirs is None else f"blk.{match.group(1)}.{theirs}"


def _gate_up_bias(ckpt: Checkpoint, layer: int, dtype) -> torch.Tensor:
    """[E, 2 * expert_hidden], gate and up interleaved as the MoE expects."""
    fused = f"blk.{layer}.ffn_gate_up_exps.bias"
    if fused in ckpt:
        gate, up = ckpt.read(fused, dtype).chunk(2, dim=-1)
    else:
        gate, up = ckpt.read(f"blk.{layer}.ffn_gate_exps.bias", dtype), ckpt.read(f"blk.{layer}.ffn_up_exps.bias", dtype)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def config_from_gguf(ckpt: Checkpoint) -> GptOssConfig:
    """The sizes from tensor shapes, the rest from llama.cpp's metadata (GPT-OSS-20B's values where absent)."""
    file = ckpt.files[0]
    arch = file.value("general.architecture", ARCH)
    if arch != ARCH:
        raise LensFileError(f"{ckpt.name}: this GGUF holds a {arch} model, not GPT-OSS ({ARCH}). The Lens text encoder is "
                            "GPT-OSS-20B: e.g. llama.cpp's gpt-oss-20b MXFP4 GGUF.")
    ckpt.require(["token_embd.weight", "blk.0.attn_sinks.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate_inp.weight",
                  "blk.0.ffn_down_exps.weight"])
    defaults = GptOssConfig()
    layers = len({m.group(1) for key in ckpt.keys() if (m := re.match(r"blk\.(\d{1,9})\.", key))})
    vocab, hidden = ckpt.shape("token_embd.weight")
    heads = ckpt.shape("blk.0.attn_sinks.weight")[0]
    head_dim = file.value(f"{ARCH}.attention.key_length", ckpt.shape("blk.0.attn_q.weight")[0] // heads)
    def meta(key, default):
        return file.value(f"{ARCH}.{key}", default)
    return GptOssConfig(
        vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, head_dim=head_dim,
        kv_heads=ckpt.shape("blk.0.attn_k.weight")[0] // head_dim,
        experts=ckpt.shape("blk.0.ffn_gate_inp.weight")[0],
        expert_hidden=ckpt.shape("blk.0.ffn_down_exps.weight")[-1],
        experts_per_token=meta("expert_used_count", defaults.experts_per_token),
        sliding_window=meta("attention.sliding_window", defaults.sliding_window),
        rms_eps=meta("attention.layer_norm_rms_epsilon", defaults.rms_eps),
        rope_theta=meta("rope.freq_base", defaults.rope_theta),
        rope_factor=meta("rope.scaling.factor", defaults.rope_factor),
        rope_original_context=meta("rope.scaling.original_context_length", defaults.rope_original_context),
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)),
    )


def _bank(ckpt: Checkpoint, key: str, device):
    qtype = ckpt.gguf_type(key)
    if qtype is None:
        return DenseBank(ckpt.read(key), transposed=False).to(device)
    return GGUFBank(ckpt.read(key), qtype, ckpt.shape(key)[-1]).to(device)


def _gate_up_bank(ckpt: Checkpoint, layer: int, device):
    fused = f"blk.{layer}.ffn_gate_up_exps.weight"
    if fused not in ckpt:
        return InterleavedBank(_bank(ckpt, f"blk.{layer}.ffn_gate_exps.weight", device),
                               _bank(ckpt, f"blk.{layer}.ffn_up_exps.weight", device))
    halves = ckpt.read(fused).chunk(2, dim=1)  # [gate; up] rows, raw bytes or values alike
    qtype, in_features = ckpt.gguf_type(fused), ckpt.shape(fused)[-1]
    if qtype is None:
        return InterleavedBank(*(DenseBank(h.contiguous(), transposed=False).to(device) for h in halves))
    return InterleavedBank(*(GGUFBank(h.contiguous(), qtype, in_features).to(device) for h in halves))


def load_llama_cpp_encoder(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> GptOssEncoder:
    cfg = config_from_gguf(ckpt)
    with torch.device("meta"):
        model = GptOssEncoder(cfg)
    names = [name for name, _ in model.named_parameters()]
    file_keys = {name: _file_key(name) for name in names}
    present = {name for name, key in file_keys.items() if key is None or key in ckpt}

    def shape_of(name):
        if file_keys[name] is None:
            return (cfg.experts, 2 * cfg.expert_hidden)
        return ckpt.shape(file_keys[name])

    def read(name, wanted):
        key = file_keys[name]
        return _gate_up_bias(ckpt, int(name.split(".")[1]), wanted) if key is None else ckpt.read(key, wanted)

    check_against_checkpoint(model, present, shape_of, ckpt.name)
    embedding_kept = ckpt.gguf_type("token_embd.weight") is None  # a quantised table is decoded once, at load
    fill_from_checkpoint(model, read, device, dtype, dtype_for={"embed_tokens.weight": None if embedding_kept else dtype},
                         device_for={"embed_tokens.weight": "cpu"})
    for i, layer in enumerate(model.layers):
        layer.mlp.gate_up, layer.mlp.down = _gate_up_bank(ckpt, i, device), _bank(ckpt, f"blk.{i}.ffn_down_exps.weight", device)
    check_banks(model, ckpt.name)
    return model
