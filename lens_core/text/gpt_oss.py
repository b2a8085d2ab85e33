"""GPT-OSS as a feature extractor for Lens (docs/architecture.md, Text features).

Our own implementation (transformers' `GptOssModel` is the reference in tests) so that the expert
banks can stay packed: `GptOssEncoder.features` runs layers 0..max(layers), captures the residual
stream after each selected layer (no final norm) and stops after the last one.

Layers come from `operations` (torch.nn, or ComfyUI's comfy.ops); the expert banks are packed layers
(quant/layers.PackedBank) that decode one routed expert at a time on the compute device. Weights that are no
layer's own (the attention sinks, the token embedding) are brought to the compute device where they are used, so
the encoder also runs with some of its layers left in CPU memory (ComfyUI's partial loading, expert streaming).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import placement
from ..checkpoint.identity import model_identity
from ..errors import LensInputError
from ..quant import formats
from ..quant.layers import PackedBank


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int = 201088
    hidden: int = 2880
    layers: int = 24
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    experts: int = 32
    experts_per_token: int = 4
    expert_hidden: int = 2880
    sliding_window: int = 128
    layer_types: tuple[str, ...] = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24))
    rms_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_context: int = 4096
    rope_truncate: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


def yarn_inv_freq_and_scale(cfg: GptOssConfig) -> tuple[torch.Tensor, float]:
    """YaRN-scaled inverse frequencies [head_dim/2] (float32) and the attention scaling for cos/sin."""
    dim, base = cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(cfg.rope_original_context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (cfg.rope_factor * pos_freqs)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return inv_freq, 0.1 * math.log(cfg.rope_factor) + 1.0


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, heads, S, head_dim] in float32; cos/sin [S, head_dim/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GptOssConfig, ops, **factory):
        super().__init__()
        self.cfg = cfg
        self.q_proj = ops.Linear(cfg.hidden, cfg.heads * cfg.head_dim, **factory)
        self.k_proj = ops.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, **factory)
        self.v_proj = ops.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, **factory)
        self.o_proj = ops.Linear(cfg.heads * cfg.head_dim, cfg.hidden, **factory)
        self.sinks = nn.Parameter(torch.zeros(cfg.heads, **factory), requires_grad=False)

    def forward(self, x, cos, sin, bias):
        b, s, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, s, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = cfg.heads // cfg.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(cfg.head_dim) + bias
        # The sink joins the softmax denominator as one more logit per head and carries no value.
        sink = self.sinks.to(x.device, torch.float32).view(1, -1, 1, 1).expand(b, -1, s, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class MoE(nn.Module):
    """Top-k experts with the clamped SwiGLU. The banks' formats (`bank_formats`: gate_up, down) come from the file;
    gate_up's rows alternate gate, up (HF's `gate_up_proj` order)."""

    def __init__(self, cfg: GptOssConfig, ops, bank_formats, **factory):
        super().__init__()
        self.cfg = cfg
        self.router = ops.Linear(cfg.hidden, cfg.experts, **factory)
        gate_up_format, down_format = bank_formats
        self.gate_up = PackedBank(gate_up_format, cfg.experts, 2 * cfg.expert_hidden, cfg.hidden, **factory)
        self.down = PackedBank(down_format, cfg.experts, cfg.hidden, cfg.expert_hidden, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        top_logits, top_experts = self.router(flat).topk(cfg.experts_per_token, dim=-1)
        top_weights = top_logits.float().softmax(dim=-1)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        dtype, device = flat.dtype, flat.device
        for expert in top_experts.unique().tolist():
            rows, slot = (top_experts == expert).nonzero(as_tuple=True)
            gate_up = F.linear(flat[rows], self.gate_up.expert_weight(expert, dtype, device), self.gate_up.expert_bias(expert, dtype, device))
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=cfg.swiglu_limit)
            up = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            hidden = (up + 1) * (gate * torch.sigmoid(gate * cfg.swiglu_alpha))
            expert_out = F.linear(hidden, self.down.expert_weight(expert, dtype, device), self.down.expert_bias(expert, dtype, device))
            out.index_add_(0, rows, expert_out.float() * top_weights[rows, slot, None])
        return out.to(x.dtype).view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig, ops, bank_formats, **factory):
        super().__init__()
        self.input_layernorm = ops.RMSNorm(cfg.hidden, eps=cfg.rms_eps, **factory)
        self.post_attention_layernorm = ops.RMSNorm(cfg.hidden, eps=cfg.rms_eps, **factory)
        self.self_attn = Attention(cfg, ops, **factory)
        self.mlp = MoE(cfg, ops, bank_formats, **factory)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssEncoder(nn.Module):
    """GPT-OSS's layers up to the last one Lens reads. `bank_formats(layer)` -> (gate_up format, down format): the packed
    formats of that layer's expert banks (the file's; dense float32 for a model built in memory)."""

    def __init__(self, cfg: GptOssConfig, operations=nn, bank_formats=None, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.stream_experts = False
        self.source_files: tuple = ()  # set by the loader (text/loader.py)
        factory = {"device": device, "dtype": dtype}
        dense = (formats.dense(dtype or torch.get_default_dtype()),) * 2
        # The token embedding is a plain table, looked up wherever it lives (see `embed`), never a ComfyUI layer:
        # ComfyUI would copy all 1.16 GB of it to the GPU for every prompt when it stays in CPU memory.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden, **factory)
        self.layers = nn.ModuleList([DecoderLayer(cfg, operations, bank_formats(i) if bank_formats else dense, **factory)
                                     for i in range(cfg.layers)])
        # float32 RoPE frequencies, a plain attribute (not a buffer): a cast of the model must not round them. Computed
        # on the CPU even when the model is built on the meta device (as the loaders do), so no loader rebuilds them.
        with torch.device("cpu"):
            self.inv_freq, self.rope_scale = yarn_inv_freq_and_scale(cfg)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (packed banks decode into it; a cast of the model changes it)."""
        return self.layers[0].input_layernorm.weight.dtype

    @functools.cached_property
    def identity(self) -> str:
        """What names this encoder in the prompt cache: the content of `source_files`, the files it was loaded from
        (checkpoint/identity.py). Hashed at first use, not at load: the first hash of a 13 GB file takes seconds (once
        per version of the file; remembered after), and a caller without a prompt cache never needs it. A model built
        in memory has no files: give it an identity of its own (`model.identity = ...`) before caching its prompts."""
        if not self.source_files:
            raise LensInputError("this text encoder was not loaded from files: set its `identity` before caching prompts.")
        return model_identity(list(self.source_files))

    @property
    def device(self) -> torch.device:
        return self.layers[0].self_attn.q_proj.weight.device

    def embed(self, input_ids: torch.Tensor, device) -> torch.Tensor:
        """The prompt's rows of the token embedding, looked up where the table lives, sent to `device`."""
        return self.embed_tokens(input_ids.to(self.embed_tokens.weight.device)).to(device, self.dtype)

    def keeps_on_cpu(self, streaming: bool | None = None) -> tuple[str, ...]:
        """Outside ComfyUI, what stays in CPU memory wherever the encoder computes: the token embedding (a prompt looks
        up a few hundred of its 201,088 rows on the CPU and sends only those: 1.16 GB less GPU memory) and, while
        streamed (`streaming`, default: as set), the expert banks."""
        streaming = self.stream_experts if streaming is None else streaming
        banks = tuple(f"layers.{i}.mlp.{bank}." for i in range(len(self.layers)) for bank in ("gate_up", "down"))
        return ("embed_tokens.",) + (banks if streaming else ())

    def place(self, device) -> "GptOssEncoder":
        """Outside ComfyUI: the weights on `device`, less what `keeps_on_cpu` names (see placement.place)."""
        placement.place(self, device, self.keeps_on_cpu())
        return self

    def set_expert_streaming(self, on: bool) -> None:
        """Outside ComfyUI: keep the packed expert banks (12 of the 13 GB) in page-locked CPU memory and copy each routed
        expert to the compute device as a layer needs it: the GPU holds ~1.3 GB (attention and norms) instead of ~11.4 GB."""
        if on != self.stream_experts:
            self.stream_experts = on
            self.place(self.device)

    def _attention_bias(self, attention_mask: torch.Tensor, sliding: bool) -> torch.Tensor:
        """[B, 1, S, S] float32: 0 where a query may see a key, -inf elsewhere (causal, padding, window)."""
        s = attention_mask.shape[1]
        q = torch.arange(s, device=attention_mask.device)[:, None]
        k = torch.arange(s, device=attention_mask.device)[None, :]
        allowed = k <= q
        if sliding:
            allowed = allowed & (k > q - self.config.sliding_window)
        allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 layers: tuple[int, ...] = (5, 11, 17, 23), device=None) -> list[torch.Tensor]:
        """The residual stream after each of `layers` (0-based), each [B, S, hidden], no final norm, computed on `device`
        (default: the model's; ComfyUI names its compute device, since under its partial loading some layers stay in
        CPU memory)."""
        if max(layers) >= len(self.layers) or min(layers) < 0:
            source = getattr(self, "source", "this text encoder")
            raise LensInputError(f"{source}: it has {len(self.layers)} layers, but the features are read after layers "
                                 f"{', '.join(map(str, layers))}. Lens needs GPT-OSS-20B (24 layers).")
        device = torch.device(device) if device is not None else self.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        positions = torch.arange(input_ids.shape[1], device=device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(device)[None]
        cos, sin = torch.cos(angles) * self.rope_scale, torch.sin(angles) * self.rope_scale
        biases = {kind: self._attention_bias(attention_mask, kind == "sliding_attention") for kind in set(self.config.layer_types)}
        x = self.embed(input_ids, device)
        captured = {}
        for index in range(max(layers) + 1):
            x = self.layers[index](x, cos, sin, biases[self.config.layer_types[index]])
            if index in layers:
                captured[index] = x
        return [captured[i] for i in layers]
