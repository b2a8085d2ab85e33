"""GPT-OSS as a feature extractor for Lens (docs/architecture.md, Text features).

Our own implementation (transformers' `GptOssModel` is the reference in tests) so that the expert
banks can stay packed: `GptOssEncoder.features` runs layers 0..max(layers), captures the residual
stream after each selected layer (no final norm) and stops after the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory.host_copies import move_model
from ..norms import RMSNorm


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
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden)
        self.sinks = nn.Parameter(torch.zeros(cfg.heads))

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
        sink = self.sinks.float().view(1, -1, 1, 1).expand(b, -1, s, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class Router(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.experts, cfg.hidden))
        self.bias = nn.Parameter(torch.zeros(cfg.experts))


class MoE(nn.Module):
    """Top-k experts with the clamped SwiGLU; the banks (`gate_up`, `down`) are set by the loader."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.gate_up_bias = nn.Parameter(torch.zeros(cfg.experts, 2 * cfg.expert_hidden))
        self.down_bias = nn.Parameter(torch.zeros(cfg.experts, cfg.hidden))
        self.gate_up: nn.Module | None = None  # expert banks (experts.py), set by the loader
        self.down: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat, self.router.weight, self.router.bias)
        top_logits, top_experts = logits.topk(cfg.experts_per_token, dim=-1)
        top_weights = top_logits.float().softmax(dim=-1)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for expert in top_experts.unique().tolist():
            rows, slot = (top_experts == expert).nonzero(as_tuple=True)
            tokens = flat[rows]
            gate_up = F.linear(tokens, self.gate_up.weight(expert, flat.dtype, flat.device), self.gate_up_bias[expert])
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=cfg.swiglu_limit)
            up = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            hidden = (up + 1) * (gate * torch.sigmoid(gate * cfg.swiglu_alpha))
            expert_out = F.linear(hidden, self.down.weight(expert, flat.dtype, flat.device), self.down_bias[expert])
            out.index_add_(0, rows, expert_out.float() * top_weights[rows, slot, None])
        return out.to(x.dtype).view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MoE(cfg)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssEncoder(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.config = cfg
        self.stream_experts = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.layers)])
        # float32 RoPE frequencies, a plain attribute (not a buffer): a cast of the model must not round them. Computed
        # on the CPU even when the model is built on the meta device (as the loaders do), so no loader rebuilds them.
        with torch.device("cpu"):
            self.inv_freq, self.rope_scale = yarn_inv_freq_and_scale(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].self_attn.q_proj.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt's rows of the token embedding, looked up where the table lives, sent to the compute device."""
        return self.embed_tokens(input_ids.to(self.embed_tokens.weight.device)).to(self.device, self.dtype)

    def cpu_resident(self) -> dict[str, bool]:
        """What stays in CPU memory wherever the encoder computes (name prefix -> whether it streams to the compute
        device, and so is page-locked): the token embedding (a prompt looks up a few hundred of its 201,088 rows, on
        the CPU, and only those go to the GPU: 1.16 GB less GPU memory) and, while streamed, the expert banks."""
        resident = {"embed_tokens.": False}
        if self.stream_experts:
            resident.update({f"layers.{i}.mlp.{bank}.": True for i in range(len(self.layers)) for bank in ("gate_up", "down")})
        return resident

    def move(self, device, keep_host_copy: bool = False) -> "GptOssEncoder":
        """Move the encoder (less what `cpu_resident` keeps in CPU memory) through its page-locked host copies
        (see memory/host_copies.py)."""
        move_model(self, device, keep_host_copy)
        return self

    def set_expert_streaming(self, on: bool) -> None:
        """Keep the packed expert banks (12 of the 13 GB) in page-locked CPU memory and copy each routed expert to the
        compute device as a layer needs it: the GPU holds ~1.3 GB (attention and norms) instead of ~11.4 GB."""
        if on != self.stream_experts:
            self.stream_experts = on
            self.move(self.device)

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
                 layers: tuple[int, ...] = (5, 11, 17, 23)) -> list[torch.Tensor]:
        """The residual stream after each of `layers` (0-based), each [B, S, hidden], no final norm."""
        if max(layers) >= len(self.layers) or min(layers) < 0:
            raise ValueError(f"layers {layers} out of range for a {len(self.layers)}-layer encoder")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(self.device)[None]
        cos, sin = torch.cos(angles) * self.rope_scale, torch.sin(angles) * self.rope_scale
        biases = {kind: self._attention_bias(attention_mask, kind == "sliding_attention") for kind in set(self.config.layer_types)}
        x = self.embed(input_ids)
        captured = {}
        for index in range(max(layers) + 1):
            x = self.layers[index](x, cos, sin, biases[self.config.layer_types[index]])
            if index in layers:
                captured[index] = x
        return [captured[i] for i in layers]
