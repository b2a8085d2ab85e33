"""`load_text_encoder`: GPT-OSS-20B from any of its published layouts, through one loader.

A layout is a small table: where its config comes from, how its expert banks are packed, and for each of our tensor
names the file keys it is made of and how they combine (a reshape, a transpose, gate and up rows interleaved, q/k/v
cut out of a fused tensor). The loader builds the encoder on the meta device with each bank in the file's format,
checks every shape by running the same combinations on shapes alone, then fills it one tensor at a time:
- HF (Microsoft / OpenAI `text_encoder/` folders): `model.` keys, config.json, MXFP4 banks (`*_blocks` + `*_scales`)
  or dense banks stored transposed;
- Comfy-Org (`gpt_oss_20b_nvfp4.safetensors`): bare keys, NVFP4 banks (or dense), sizes from shapes;
- llama.cpp GGUF: `blk.N.*` names, config from `gpt-oss.*` metadata, banks in any GGUF block type with gate and up
  split or fused (gate rows first), q/k/v split or fused (`--fuse-qkv`).
Sizes always come from tensor shapes; a config or metadata value is used only for what shapes cannot tell (RoPE,
window, norm epsilon, experts per token), each checked for type and range first.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.files import read_json_object, short
from ..checkpoint.identify import find_key_prefix
from ..checkpoint.source import ShardSet, open_component
from ..checkpoint.tensor_loading import check_against_checkpoint, fill_from_checkpoint, missing_numbers
from ..device import resolve_compute
from ..errors import LensFileError
from ..quant import formats
from .gpt_oss import GptOssConfig, GptOssEncoder
from .tokenizer import tokenizer_file

ARCH = "gpt-oss"
_EXPECTED = (
    "the GPT-OSS-20B text encoder: Comfy-Org's gpt_oss_20b_nvfp4.safetensors (models/text_encoders) "
    "or Microsoft/OpenAI's text_encoder/ folder (model-0000k-of-00003.safetensors + config.json), "
    "or llama.cpp's gpt-oss-20b GGUF"
)
_BANK = re.compile(r"layers\.(\d+)\.mlp\.(gate_up|down)\.(weight|weight_scale|weight_scale_2|bias)")
_QKV = re.compile(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _same(tensors):
    return tensors[0]


def _number(value, where: str, field: str, low: float, high: float, whole: bool = False):
    """A config or metadata value that must be a number in [low, high] (a whole number if `whole`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
    if not ok or (whole and value != int(value)):
        raise LensFileError(f"{where}: {field} is {short(value)}, not a {'whole number' if whole else 'number'} between "
                            f"{low:g} and {high:g}. The file is damaged or not GPT-OSS: download it again.")
    return int(value) if whole else float(value)


def _interleave_rows(tensors):
    """gate [E, n, ...] and up [E, n, ...] -> [E, 2n, ...] with gate row j at 2j and up row j at 2j + 1 (the order of
    HF's fused gate_up, which the MoE splits by even and odd rows)."""
    gate, up = tensors
    return torch.stack([gate, up], dim=2).flatten(1, 2)


class _Layout:
    """One layout's table: `prefix`, `config()`, `bank_format(layer, which)` and `parts(name) -> (keys, combine)`."""

    prefix = ""

    def __init__(self, ckpt: ShardSet, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype

    def parts(self, name: str) -> tuple[list[str], object]:
        return [self.prefix + name], _same

    def _size(self, name: str, axis: int, what: str) -> int:
        key = self.parts(name)[0][0]
        shape = self.ckpt.shape(key)
        if not -len(shape) <= axis < len(shape) or shape[axis] == 0:
            raise LensFileError(f"{self.ckpt.name}: {short(key)} has shape {list(shape)[:8]}, which cannot give the text "
                                f"encoder's {what}. The file is damaged or not GPT-OSS.")
        return shape[axis]

    def layer_count(self) -> int:
        return len({int(m.group(1)) for k in self.ckpt.keys() if (m := re.match(re.escape(self.prefix) + r"layers\.(\d{1,9})\.", k))})

    def sizes(self) -> dict:
        """What every layout reads from its shapes, under GptOssConfig's names."""
        heads = self._size("layers.0.self_attn.sinks", 0, "head count")
        q_rows, kv_rows = self._qkv_rows("q"), self._qkv_rows("k")
        if q_rows % heads or (q_rows // heads) % 2 or kv_rows % (q_rows // heads) or heads % (kv_rows // (q_rows // heads) or 1):
            raise LensFileError(f"{self.ckpt.name}: {q_rows} query and {kv_rows} key rows do not make heads of one even size "
                                f"for {heads} query heads. The file is damaged or not GPT-OSS.")
        head_dim, layers = q_rows // heads, self.layer_count()
        return dict(vocab_size=self._size("embed_tokens.weight", 0, "vocabulary"), hidden=self._size("embed_tokens.weight", 1, "width"),
                    layers=layers, heads=heads, head_dim=head_dim, kv_heads=kv_rows // head_dim,
                    experts=self._size("layers.0.mlp.router.weight", 0, "expert count"),
                    expert_hidden=self._expert_hidden(),
                    layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)))

    def _qkv_rows(self, which: str) -> int:
        return self._size(f"layers.0.self_attn.{which}_proj.weight", 0, "attention width")

    def _expert_hidden(self) -> int:
        return self._size("layers.0.mlp.gate_up.bias", -1, "expert width") // 2


class _HFLayout(_Layout):
    """Microsoft's / OpenAI's HF folders: `model.` keys, config.json, MXFP4 or dense (stored [E, in, out]) banks."""

    prefix = "model."
    _BANKS = {"gate_up": "gate_up_proj", "down": "down_proj"}

    def _base(self, layer: str | int, which: str) -> str:
        return f"{self.prefix}layers.{layer}.mlp.experts.{self._BANKS[which]}"

    def bank_format(self, layer: int, which: str):
        base = self._base(layer, which)
        if base + "_blocks" in self.ckpt:
            return formats.MXFP4_HF
        if base in self.ckpt:
            return formats.dense(self.dtype)
        raise LensFileError(f"{self.ckpt.name}: expert weights {short(base)}* are missing. The file is incomplete: download it again.")

    def parts(self, name):
        bank = _BANK.fullmatch(name)
        if bank is None:
            return super().parts(name)
        layer, which, part = bank.groups()
        base = self._base(layer, which)
        if part == "bias":
            return [base + "_bias"], _same
        if part == "weight_scale":
            return [base + "_scales"], _same
        if base + "_blocks" in self.ckpt:
            return [base + "_blocks"], lambda t: t[0].flatten(-2)  # [E, out, G, 16] -> [E, out, G * 16]
        return [base], lambda t: t[0].transpose(-1, -2).contiguous()

    def config(self) -> GptOssConfig:
        sizes, defaults = self.sizes(), GptOssConfig()
        config_file = Path(self.ckpt.files[0].path).parent / "config.json"
        if not config_file.exists():
            return GptOssConfig(**sizes)
        declared, where = read_json_object(config_file, "config.json"), str(config_file)
        if declared.get("model_type", "gpt_oss") != "gpt_oss":
            raise LensFileError(f"{where}: model_type is {short(declared.get('model_type'))}, not gpt_oss. Expected {_EXPECTED}.")
        for field in ("rope_parameters", "rope_scaling"):  # transformers 5 writes the first, older versions the second
            if not isinstance(declared.get(field) or {}, dict):
                raise LensFileError(f"{where}: {field} is {short(declared[field])}, not an object. Download config.json again.")
        rope = declared.get("rope_parameters") or {**(declared.get("rope_scaling") or {}), "rope_theta": declared.get("rope_theta")}
        declared_layers = _number(declared.get("num_hidden_layers", sizes["layers"]), where, "num_hidden_layers", 1, 1 << 16, True)
        if declared_layers > sizes["layers"]:
            present = {int(m.group(1)) for k in self.ckpt.keys() if (m := re.match(r"model\.layers\.(\d{1,9})\.", k))}
            raise LensFileError(f"{self.ckpt.name}: its config.json says {declared_layers:,} layers, but "
                                f"{missing_numbers(present, declared_layers)} are missing from the weights. Either a shard is "
                                "missing (download every file of the text encoder again) or config.json is damaged.")
        if declared_layers < sizes["layers"]:
            raise LensFileError(f"{where} says {declared_layers:,} layers, but the weights beside it hold {sizes['layers']:,}. "
                                "The folder mixes files of different models: download config.json and the weights again.")
        if "layer_types" in declared:
            types = declared["layer_types"]
            if not isinstance(types, list) or len(types) < sizes["layers"] or not all(
                    t in ("sliding_attention", "full_attention") for t in types):
                raise LensFileError(f"{where}: layer_types is not sliding_attention / full_attention for every layer. "
                                    "Download config.json again.")
            sizes["layer_types"] = tuple(types[:sizes["layers"]])

        def number(source, field, default, low, high, whole=False):
            value = source.get(field)
            return _number(default if value is None else value, where, field, low, high, whole)

        top_k = declared.get("num_experts_per_tok", declared.get("experts_per_token"))
        return GptOssConfig(
            **sizes,
            experts_per_token=_number(defaults.experts_per_token if top_k is None else top_k, where, "num_experts_per_tok", 1,
                                      sizes["experts"], True),
            sliding_window=number(declared, "sliding_window", defaults.sliding_window, 1, 1 << 30, True),
            rms_eps=number(declared, "rms_norm_eps", defaults.rms_eps, 1e-12, 1.0),
            swiglu_limit=number(declared, "swiglu_limit", defaults.swiglu_limit, 1e-6, 1e6),
            rope_theta=number(rope, "rope_theta", defaults.rope_theta, 1.0 + 1e-6, 1e12),
            rope_factor=number(rope, "factor", defaults.rope_factor, 1.0, 1e6),
            rope_beta_fast=number(rope, "beta_fast", defaults.rope_beta_fast, 1e-6, 1e6),
            rope_beta_slow=number(rope, "beta_slow", defaults.rope_beta_slow, 1e-6, 1e6),
            rope_original_context=number(rope, "original_max_position_embeddings", defaults.rope_original_context, 1, 1 << 30, True),
            rope_truncate=bool(rope.get("truncate", defaults.rope_truncate)),
        )


class _ComfyLayout(_HFLayout):
    """Comfy-Org's single file: bare keys, NVFP4 (or dense [E, out, in]) banks under `mlp.experts.*_proj`."""

    prefix = ""

    def bank_format(self, layer, which):
        base = self._base(layer, which)
        if base + ".weight_scale" in self.ckpt:
            return formats.NVFP4_COMFY
        if base + ".weight" in self.ckpt:
            return formats.dense(self.dtype)
        raise LensFileError(f"{self.ckpt.name}: expert weights {short(base)}* are missing. The file is incomplete: download it again.")

    def parts(self, name):
        bank = _BANK.fullmatch(name)
        if bank is None:
            return _Layout.parts(self, name)
        layer, which, part = bank.groups()
        return [f"{self._base(layer, which)}.{part}"], _same

    def config(self) -> GptOssConfig:
        return GptOssConfig(**self.sizes())


class _LlamaCppLayout(_Layout):
    """llama.cpp's GGUF: its names mapped back, config from `gpt-oss.*` metadata (GPT-OSS-20B's values where absent)."""

    _NAMES = {  # ours, under layers.N. -> llama.cpp's, under blk.N.
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
        "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight", "mlp.router.bias": "ffn_gate_inp.bias",
        "mlp.down.weight": "ffn_down_exps.weight", "mlp.down.bias": "ffn_down_exps.bias",
    }

    def __init__(self, ckpt: ShardSet, dtype: torch.dtype):
        super().__init__(ckpt, dtype)
        self.file, self.fused_qkv = ckpt.files[0], "blk.0.attn_qkv.weight" in ckpt

    def layer_count(self) -> int:
        return len({int(m.group(1)) for k in self.ckpt.keys() if (m := re.match(r"blk\.(\d{1,9})\.", k))})

    def _qkv_rows(self, which: str) -> int:
        if not self.fused_qkv:
            return super()._qkv_rows(which)
        heads = self._size("layers.0.self_attn.sinks", 0, "head count")
        total = self.ckpt.shape("blk.0.attn_qkv.weight")[0]
        kv = self.meta("attention.head_count_kv", None, 1, heads, whole=True)
        head_dim = self.meta("attention.key_length", None, 2, 1 << 16, whole=True)
        if total != (heads + 2 * kv) * head_dim:
            raise LensFileError(f"{self.ckpt.name}: blk.0.attn_qkv has {total} rows, not ({heads} + 2 x {kv}) heads of {head_dim}. "
                                "The file is damaged: download it again.")
        return (heads if which == "q" else kv) * head_dim

    def _qkv_slice(self, which: str) -> slice:
        q, kv = self._qkv_rows("q"), self._qkv_rows("k")
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[which]

    def bank_format(self, layer, which):
        key = self.parts(f"layers.{layer}.mlp.{which}.weight")[0][0]
        if key not in self.ckpt:
            raise LensFileError(f"{self.ckpt.name}: expert weights {short(key)} are missing. The file is incomplete: download it again.")
        return self.ckpt.packed_format(key) or formats.dense(self.dtype)

    def parts(self, name):
        if name == "embed_tokens.weight":
            return ["token_embd.weight"], _same
        qkv = _QKV.fullmatch(name)
        if qkv is not None:
            layer, which, kind = qkv.groups()
            if not self.fused_qkv:
                return [f"blk.{layer}.attn_{which}.{kind}"], _same
            rows = self._qkv_slice(which)
            return [f"blk.{layer}.attn_qkv.{kind}"], lambda t: t[0][rows].contiguous()
        bank = _BANK.fullmatch(name)
        if bank is not None and bank.group(2) == "gate_up":
            layer, _, part = bank.groups()
            fused = f"blk.{layer}.ffn_gate_up_exps.{part}"
            if fused in self.ckpt:  # gate rows first, then up
                return [fused], lambda t: _interleave_rows(t[0].chunk(2, dim=1 if part == "weight" else -1))
            return [f"blk.{layer}.ffn_gate_exps.{part}", f"blk.{layer}.ffn_up_exps.{part}"], _interleave_rows
        layer_name = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if layer_name is None:
            return [name], _same
        return [f"blk.{layer_name.group(1)}.{self._NAMES.get(layer_name.group(2), layer_name.group(2))}"], _same

    def _expert_hidden(self) -> int:
        return self._size("layers.0.mlp.down.weight", -1, "expert width")

    def meta(self, key: str, default, low, high, whole=False):
        value = self.file.value(f"{ARCH}.{key}", default)
        return _number(value, str(self.ckpt.name), f"metadata {ARCH}.{key}", low, high, whole)

    def config(self) -> GptOssConfig:
        arch = self.file.value("general.architecture", ARCH)
        if arch != ARCH:
            raise LensFileError(f"{self.ckpt.name}: this GGUF holds a {short(arch)} model, not GPT-OSS ({ARCH}). The Lens "
                                "text encoder is GPT-OSS-20B: e.g. llama.cpp's gpt-oss-20b MXFP4 GGUF.")
        attention = ["blk.0.attn_qkv.weight"] if self.fused_qkv else ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]
        self.ckpt.require(["token_embd.weight", "blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.weight", "blk.0.ffn_down_exps.weight",
                           *attention])
        sizes, defaults = self.sizes(), GptOssConfig()
        key_length = self.file.value(f"{ARCH}.attention.key_length", sizes["head_dim"])
        if key_length != sizes["head_dim"]:
            raise LensFileError(f"{self.ckpt.name}: metadata {ARCH}.attention.key_length is {short(key_length)}, but the "
                                f"attention weights have heads of {sizes['head_dim']}. The file is damaged: download it again.")
        return GptOssConfig(
            **sizes,
            experts_per_token=self.meta("expert_used_count", defaults.experts_per_token, 1, sizes["experts"], whole=True),
            sliding_window=self.meta("attention.sliding_window", defaults.sliding_window, 1, 1 << 30, whole=True),
            rms_eps=self.meta("attention.layer_norm_rms_epsilon", defaults.rms_eps, 1e-12, 1.0),
            rope_theta=self.meta("rope.freq_base", defaults.rope_theta, 1.0 + 1e-6, 1e12),
            rope_factor=self.meta("rope.scaling.factor", defaults.rope_factor, 1.0, 1e6),
            rope_original_context=self.meta("rope.scaling.original_context_length", defaults.rope_original_context, 1, 1 << 30,
                                            whole=True),
        )


def _layout(ckpt: ShardSet, dtype: torch.dtype) -> _Layout:
    """The layout of a file: llama.cpp's by its names, else HF's (`model.` keys) or Comfy-Org's (bare keys)."""
    if "token_embd.weight" in ckpt and ("blk.0.attn_q.weight" in ckpt or "blk.0.attn_qkv.weight" in ckpt):
        return _LlamaCppLayout(ckpt, dtype)
    prefix = find_key_prefix(ckpt, ("model.", ""), ("layers.0.self_attn.sinks",), "GPT-OSS", _EXPECTED)
    return _HFLayout(ckpt, dtype) if prefix == "model." else _ComfyLayout(ckpt, dtype)


def check_file(path: str | os.PathLike) -> None:
    """Raise LensFileError unless `path` holds GPT-OSS, from the file headers alone (no weights read)."""
    _layout(open_component(path, "text_encoder", "model"), torch.float32).config()


def _check_layers(layout: _Layout, cfg: GptOssConfig) -> None:
    """Every layer GPT-OSS-20B has, for its width, must be there (a missing shard otherwise goes unseen)."""
    expected = GptOssConfig().layers if cfg.hidden == GptOssConfig().hidden else cfg.layers
    pattern = r"blk\.(\d{1,9})\.attn_sinks\.weight" if isinstance(layout, _LlamaCppLayout) else \
        re.escape(layout.prefix) + r"layers\.(\d{1,9})\.self_attn\.sinks"
    present = {int(m.group(1)) for k in layout.ckpt.keys() if (m := re.fullmatch(pattern, k))}
    if len({i for i in present if i < expected}) < expected or cfg.layers > len(present):
        raise LensFileError(f"{layout.ckpt.name}: the model has {max(expected, cfg.layers):,} layers, but "
                            f"{missing_numbers(present, max(expected, cfg.layers))} are missing. The file is incomplete (a "
                            "missing shard?): download every file of the text encoder again.")


def encoder_files(path: str | os.PathLike) -> list[Path]:
    """Every file that changes what the encoder at `path` computes: its weights, the config.json beside them and the
    tokenizer.json the tokenizer is read from (identity.model_identity of these names the encoder)."""
    ckpt = open_component(path, "text_encoder", "model")
    files = [Path(f.path) for f in ckpt.files]
    config = files[0].parent / "config.json"
    tokenizer = tokenizer_file(Path(path))
    return files + [p for p in (config, tokenizer) if p is not None and p.is_file()]


def load_text_encoder(path: str | os.PathLike, device=None, dtype=None, operations=nn) -> GptOssEncoder:
    """Load GPT-OSS for feature extraction. Defaults: CUDA + bf16 when available, else CPU + fp32.

    The token embedding keeps the file's dtype where it is a float (a lookup table needs no upcast: saves ~1.2 GB)
    and stays in CPU memory (only the looked-up rows go to the compute device). `operations`: the layer classes
    (torch.nn; ComfyUI passes its comfy.ops).
    """
    device, dtype = resolve_compute(device, dtype, what="the Lens text encoder")
    ckpt = open_component(path, "text_encoder", "model")
    layout = _layout(ckpt, dtype)
    cfg = layout.config()
    _check_layers(layout, cfg)
    bank_formats = {i: (layout.bank_format(i, "gate_up"), layout.bank_format(i, "down")) for i in range(cfg.layers)}
    with torch.device("meta"):
        model = GptOssEncoder(cfg, operations, bank_formats.__getitem__, dtype=dtype)
    expected = model.state_dict(keep_vars=True)

    def shape_of(name, packed):
        keys, combine = layout.parts(name)
        stored = ckpt.stored_shape if packed else ckpt.shape
        return tuple(combine([torch.empty(stored(key), device="meta") for key in keys]).shape)

    def read(name, wanted):
        keys, combine = layout.parts(name)
        return combine([ckpt.raw(key) if wanted is None else ckpt.read(key, wanted) for key in keys])

    for name in expected:
        ckpt.require(layout.parts(name)[0])
    check_against_checkpoint(model, expected.keys(), shape_of, ckpt.name)
    embedding = layout.parts("embed_tokens.weight")[0][0]
    keep_embedding_dtype = ckpt.packed_format(embedding) is None  # a quantised table is decoded once, at load
    fill_from_checkpoint(model, read, device, dtype, dtype_for={"embed_tokens.weight": None if keep_embedding_dtype else dtype},
                         device_for={"embed_tokens.weight": "cpu"}, file_name=ckpt.name)
    model.source = ckpt.name
    model.source_files = tuple(encoder_files(path))
    return model
