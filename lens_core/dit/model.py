"""The Lens denoiser: a dual-stream MMDiT (docs/architecture.md, The denoiser).

Every block keeps separate image and text weights and runs one joint attention over
[image tokens ; text tokens]. Norms, RoPE and the softmax run in float32 whatever the
compute dtype; the rest runs in the compute dtype (bfloat16 on GPUs, float32 on CPUs).

The layers are built from `operations` (PyTorch's `torch.nn` by default): ComfyUI hands in its own layer classes
(comfy.ops), so that its weight casting, partial loading and LoRA patches act on every layer, as for its own models.
The forward takes ComfyUI's `transformer_options` (block replacement and patches, see `LensDiT.forward`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy_kitchen
import torch
import torch.nn.functional as F
from torch import nn

from .. import placement
from ..errors import LensInputError
from .block_swap import BlockSwap
from .rope import apply_rope, rope_frequencies

TEXT_MASK_MODES = ("every_block", "first_block")
ATTENTION_BACKENDS = ("sdpa", "sage")
log = logging.getLogger("lens_core")


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a Lens DiT; the real model is the default, small test models override them."""

    hidden: int = 1536
    heads: int = 24
    blocks: int = 48
    mlp_hidden: int = 4096
    text_width: int = 2880
    text_layers: int = 4
    in_channels: int = 128
    out_channels: int = 128
    time_channels: int = 256
    axes_dims: tuple[int, int, int] = (8, 28, 28)
    head_dim: int = 64


def check_text_features(config: DiTConfig, features: torch.Tensor, which: str) -> None:
    """Refuse text features a denoiser of this config cannot take. `which`: "positive", "negative" or ""."""
    if features.ndim != 4 or features.shape[2:] != (config.text_layers, config.text_width):
        raise LensInputError(
            f"the {which + ' ' if which else ''}text features have shape {list(features.shape)}; this denoiser takes "
            f"GPT-OSS features [B, S, {config.text_layers}, {config.text_width}] from the Lens text encoder (GPT-OSS-20B)."
        )


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, ops, **factory):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False, **factory)
        self.w2 = ops.Linear(hidden, dim, bias=False, **factory)
        self.w3 = ops.Linear(dim, hidden, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x)
        if torch.is_grad_enabled():
            return self.w2(F.silu(gate) * self.w3(x))
        # Inference: SiLU and the product in place, two [tokens, 4096] temporaries fewer (6 % of the MLP's CPU time).
        return self.w2(F.silu(gate, inplace=True).mul_(self.w3(x)))


class Modulation(nn.Module):
    """`*_mod.1`: SiLU(temb) -> 6 vectors: shift1, scale1, gate1, shift2, scale2, gate2."""

    def __init__(self, dim: int, ops, **factory):
        super().__init__()
        self.register_module("1", ops.Linear(dim, 6 * dim, **factory))

    def forward(self, silu_temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """From SiLU(temb), computed once per forward for all blocks."""
        return getattr(self, "1")(silu_temb).unsqueeze(1).chunk(6, dim=-1)


def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """normed * (1 + scale) + shift in one fused multiply-add."""
    return torch.addcmul(shift, normed, 1 + scale)


def _plain_weight(norm: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """A norm's weight where it can be used as it is (on the compute device, nothing for ComfyUI to cast or patch on
    use); None otherwise, and the norm module is called instead."""
    if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or norm.weight.device != like.device:
        return None
    return norm.weight.to(like.dtype)


class JointAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, **factory):
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.img_qkv = ops.Linear(d, 3 * d, **factory)
        self.txt_qkv = ops.Linear(d, 3 * d, **factory)
        self.norm_q = ops.RMSNorm(cfg.head_dim, eps=1e-6, **factory)
        self.norm_k = ops.RMSNorm(cfg.head_dim, eps=1e-6, **factory)
        self.norm_added_q = ops.RMSNorm(cfg.head_dim, eps=1e-6, **factory)
        self.norm_added_k = ops.RMSNorm(cfg.head_dim, eps=1e-6, **factory)
        self.to_out = nn.ModuleList([ops.Linear(d, d, **factory)])
        self.to_add_out = ops.Linear(d, d, **factory)
        self.sage = None  # sageattention's kernel, when the model chose it (LensDiT.use_attention)

    def _attend(self, q, k, v, key_bias):
        """SDPA, or SageAttention where chosen and usable: a CUDA bf16 pass with no padded text key (it takes no mask)."""
        if self.sage is not None and key_bias is None and q.is_cuda and q.dtype == torch.bfloat16:
            return self.sage(q, k, v, tensor_layout="HND", is_causal=False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, n, 64]
        return q, k, v

    def _norm_and_rope(self, iq, ik, tq, tk, rope):
        """q and k of the joint sequence, RMS-normed (float32 statistics) and rotated (in float32, cast back once).

        Eager, with the norms' weights on the compute device: comfy-kitchen's fused RMSNorm + RoPE, one kernel per
        stream on GPUs (its CUDA or Triton backend), PyTorch's ops elsewhere. Under torch.compile, or where ComfyUI
        casts the norms' weights on use: the norm modules and plain PyTorch RoPE (inductor fuses them itself).
        """
        dtype = iq.dtype
        norms = (self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k)
        weights = [_plain_weight(norm, iq) for norm in norms]
        if torch.compiler.is_compiling() or any(w is None for w in weights):
            q = apply_rope(torch.cat([self.norm_q(iq), self.norm_added_q(tq)], dim=2), rope, dtype)
            k = apply_rope(torch.cat([self.norm_k(ik), self.norm_added_k(tk)], dim=2), rope, dtype)
            return q, k
        n_img, eps = iq.shape[2], self.norm_q.eps
        rope = rope[None, None]  # [1, 1, L, pairs, 2, 2]: the [B, heads, L, head_dim] layout
        iq, ik = comfy_kitchen.rms_rope(iq, ik, rope[:, :, :n_img], weights[0], weights[1], eps)
        if tq.shape[2] == 0:  # no text token (an empty prompt)
            return iq, ik
        tq, tk = comfy_kitchen.rms_rope(tq, tk, rope[:, :, n_img:], weights[2], weights[3], eps)
        return torch.cat([iq, tq], dim=2), torch.cat([ik, tk], dim=2)

    def forward(self, img, txt, rope, key_bias):
        n_img = img.shape[1]
        iq, ik, iv = self._heads(self.img_qkv(img))
        tq, tk, tv = self._heads(self.txt_qkv(txt))
        q, k = self._norm_and_rope(iq, ik, tq, tk, rope)
        v = torch.cat([iv, tv], dim=2)
        out = self._attend(q, k, v, key_bias).transpose(1, 2)  # [B, L, heads, head_dim]
        # Each stream's part gathered into its own contiguous [B, n, hidden] in one copy, so the projections run as
        # single fused matmul + bias (a slice of one joined tensor is strided for B > 1: another copy and a bias add).
        img_out, txt_out = out[:, :n_img].flatten(2), out[:, n_img:].flatten(2)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, **factory):
        super().__init__()
        d = cfg.hidden
        self.attn = JointAttention(cfg, ops, **factory)
        self.img_mod = Modulation(d, ops, **factory)
        self.txt_mod = Modulation(d, ops, **factory)
        self.img_norm1, self.img_norm2 = ops.RMSNorm(d, eps=1e-6, **factory), ops.RMSNorm(d, eps=1e-6, **factory)
        self.txt_norm1, self.txt_norm2 = ops.RMSNorm(d, eps=1e-6, **factory), ops.RMSNorm(d, eps=1e-6, **factory)
        self.img_mlp = SwiGLU(d, cfg.mlp_hidden, ops, **factory)
        self.txt_mlp = SwiGLU(d, cfg.mlp_hidden, ops, **factory)

    def forward(self, img, txt, silu_temb, rope, key_bias):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(silu_temb)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(silu_temb)
        img_attn, txt_attn = self.attn(
            _modulate(self.img_norm1(img), i_shift1, i_scale1),
            _modulate(self.txt_norm1(txt), t_shift1, t_scale1),
            rope,
            key_bias,
        )
        img = torch.addcmul(img, i_gate1, img_attn)
        txt = torch.addcmul(txt, t_gate1, txt_attn)
        img = torch.addcmul(img, i_gate2, self.img_mlp(_modulate(self.img_norm2(img), i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(_modulate(self.txt_norm2(txt), t_shift2, t_scale2)))
        return img, txt


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, **factory):
        super().__init__()
        self.channels = cfg.time_channels
        self.linear_1 = ops.Linear(cfg.time_channels, cfg.hidden, **factory)
        self.linear_2 = ops.Linear(cfg.hidden, cfg.hidden, **factory)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        # sigma passes through the activation dtype first: bf16 quantises it in the reference too.
        t = sigma.to(dtype).float() * 1000.0
        args = t[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class TimeTextEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig, ops, **factory):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(cfg, ops, **factory)


class OutputNorm(nn.Module):
    """LayerNorm without affine, then scale-first / shift-second modulation."""

    def __init__(self, dim: int, ops, **factory):
        super().__init__()
        self.linear = ops.Linear(dim, 2 * dim, **factory)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(silu_temb).unsqueeze(1).chunk(2, dim=-1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return _modulate(normed, shift, scale)


class LensDiT(nn.Module):
    """`dit(x, sigma, text, text_mask, grid) -> velocity`, all in the token layout (docs/architecture.md, The latent space).

    x [B, h*w, 128] (row-major tokens), sigma [B], text [B, S, text_layers, text_width],
    text_mask [B, S] bool (True = real token) or None (no padded token), grid = (h, w).
    Returns [B, h*w, 128] on the model's device, in its compute dtype; inputs may come from any device.

    text_mask (the constructor's): "every_block" masks padded text keys in all blocks, like ComfyUI's
    native Lens and musubi-tuner; "first_block" masks them in block 0 only, like the diffusers port
    (whose goldens need it). The two agree whenever no text key is padded.
    operations: the layer classes (torch.nn, or ComfyUI's comfy.ops); dtype: the compute dtype, in which the unpacked
    weights are stored (packed layers decode into it).
    """

    def __init__(self, cfg: DiTConfig, text_mask: str = "every_block", operations=nn, device=None, dtype=None):
        super().__init__()
        if text_mask not in TEXT_MASK_MODES:
            raise LensInputError(f"text_mask must be one of {', '.join(TEXT_MASK_MODES)}, got {text_mask!r}.")
        self.config = cfg
        self.text_mask = text_mask
        self.compiled = False
        self._block_swap: BlockSwap | None = None
        ops, factory = operations, {"device": device, "dtype": dtype}
        self.img_in = ops.Linear(cfg.in_channels, cfg.hidden, **factory)
        self.txt_norm = nn.ModuleList([ops.RMSNorm(cfg.text_width, eps=1e-5, **factory) for _ in range(cfg.text_layers)])
        self.txt_in = ops.Linear(cfg.text_layers * cfg.text_width, cfg.hidden, **factory)
        self.time_text_embed = TimeTextEmbed(cfg, ops, **factory)
        self.transformer_blocks = nn.ModuleList([Block(cfg, ops, **factory) for _ in range(cfg.blocks)])
        self.norm_out = OutputNorm(cfg.hidden, ops, **factory)
        self.proj_out = ops.Linear(cfg.hidden, cfg.out_channels, **factory)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (packed layers decode into it; a cast of the model changes it)."""
        return self.txt_norm[0].weight.dtype

    def use_attention(self, backend: str) -> None:
        """"sdpa" (PyTorch's, the default, any device) or "sage" (SageAttention, CUDA only, when installed; passes with
        padded text keys still use SDPA, since SageAttention takes no mask)."""
        if backend not in ATTENTION_BACKENDS:
            raise LensInputError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}.")
        kernel = None
        if backend == "sage":
            try:
                from sageattention import sageattn as kernel
            except ImportError:
                raise LensInputError("attention 'sage' needs the sageattention package (CUDA GPUs only: pip install sageattention); "
                                     "'sdpa' works everywhere.") from None
        for block in self.transformer_blocks:
            block.attn.sage = kernel

    @property
    def block_swap(self) -> BlockSwap | None:
        """The block swap of the model whose weights these are: a denoiser with LoRAs (apply_loras) shares its base's
        block weights, so it shares where they live too."""
        return self.__dict__.get("base_model", self)._block_swap

    def swap_blocks(self, count: int) -> None:
        """Outside ComfyUI: keep the last `count` blocks in CPU memory and stream them to the compute device as they run
        (see block_swap.py); 0 keeps every block on the model's device. On a denoiser with LoRAs it changes the base's
        (shared) blocks."""
        if not 0 <= count < self.config.blocks:
            raise LensInputError(f"blocks on the CPU must be between 0 and {self.config.blocks - 1}, got {count}.")
        base = self.__dict__.get("base_model", self)
        if base is not self:
            return base.swap_blocks(count)
        if count == (len(self.block_swap.indices) if self.block_swap else 0):
            return
        blocks = self.config.blocks
        self._block_swap = BlockSwap(list(range(blocks - count, blocks))) if count else None
        self.place(self.device)
        if count:
            log.info("Lens: %d of %d denoiser blocks stay in CPU memory (%.2f GB) and stream to the compute device as they run",
                     count, blocks, sum(placement.weight_bytes(self.transformer_blocks[i]) for i in self.block_swap.indices) / 1e9)

    def keeps_on_cpu(self) -> tuple[str, ...]:
        """The weight name prefixes that stay in CPU memory wherever the model computes: the swapped blocks."""
        return self.block_swap.prefixes() if self.block_swap is not None else ()

    def place(self, device) -> "LensDiT":
        """Outside ComfyUI: the weights on `device`, less the swapped blocks (see placement.place)."""
        placement.place(self, device, self.keeps_on_cpu())
        return self

    def compile_blocks(self, cuda_graphs: bool = False) -> None:
        """Compile every block with torch.compile, at the first forward, on the device the model then runs on.

        All 48 blocks share one compiled graph (their weights are graph inputs), and shapes are dynamic, so a
        new image size or prompt length reuses it. cuda_graphs: also replay each block as a CUDA graph
        (torch.compile's "reduce-overhead"), an experiment for Turbo's few steps where launch overhead weighs most
        (bench_sampling.py --mode compiled_cudagraphs); each new shape records 48 graphs.
        """
        for block in self.transformer_blocks:
            block.compile(dynamic=True, mode="reduce-overhead" if cuda_graphs else None)
        self.compiled = True

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def check_inputs(self, x, sigma, text, text_mask, grid) -> None:
        """Raise LensInputError when the inputs cannot belong together (before any compute)."""
        cfg = self.config
        h, w = grid
        if x.ndim != 3 or x.shape[1] != h * w or x.shape[2] != cfg.in_channels:
            raise LensInputError(
                f"image tokens have shape {tuple(x.shape)}; expected [B, {h}*{w}={h * w}, {cfg.in_channels}] "
                f"for a {h}x{w} latent grid. Is this a Lens latent (128 channels)?"
            )
        check_text_features(cfg, text, "")
        if text_mask is not None and text_mask.shape != text.shape[:2]:
            raise LensInputError(f"text mask shape {tuple(text_mask.shape)} does not match text features {tuple(text.shape[:2])}.")
        if sigma.shape != (x.shape[0],) or text.shape[0] != x.shape[0]:
            raise LensInputError(
                f"batch sizes differ: x {x.shape[0]}, sigma {tuple(sigma.shape)}, text {text.shape[0]}."
            )

    def forward(self, x, sigma, text, text_mask, grid, transformer_options: dict | None = None, device=None):
        """The velocity, computed on `device` (default: the model's; ComfyUI names its compute device, since under its
        partial loading some layers stay in CPU memory). `transformer_options` (ComfyUI's, optional) may hold, as for
        ComfyUI's native Lens:
        - "patches_replace" -> "dit" -> ("double_block", i): called instead of block i with {"img", "txt", "vec" (SiLU of
          the time embedding), "pe" (the RoPE table), "attn_mask", "transformer_options"} and {"original_block"};
          returns {"img", "txt"};
        - "patches" -> "post_input" (after the input projections) and "double_block" (after each block): called with
          {"img", "txt", ...}, return {"img", "txt"}."""
        self.check_inputs(x, sigma, text, text_mask, grid)
        options = dict(transformer_options or {})
        patches, replace = options.get("patches", {}), options.get("patches_replace", {}).get("dit", {})
        dtype, device = self.dtype, torch.device(device) if device is not None else self.device
        h, w = grid
        if text_mask is not None and text_mask.device.type == "cpu" and bool(text_mask.all()):
            text_mask = None  # free to check on the CPU; on a GPU it would sync, so callers pass None there
        x = x.to(device, dtype)
        text = text.to(device, dtype)
        sigma = sigma.to(device)

        silu_temb = F.silu(self.time_text_embed.timestep_embedder(sigma, dtype))  # what every modulation takes
        img = self.img_in(x)
        txt = self.txt_in(torch.cat([norm(text[:, :, i]) for i, norm in enumerate(self.txt_norm)], dim=-1))
        for patch in patches.get("post_input", ()):
            out = patch({"img": img, "txt": txt, "transformer_options": options})
            img, txt = out["img"], out["txt"]

        rope = rope_frequencies(h, w, text.shape[1], self.config.axes_dims, device)
        key_bias = None if text_mask is None else _key_bias(text_mask.to(device, torch.bool), h * w, dtype)
        blocks = self.transformer_blocks if self.block_swap is None else self.block_swap.streamed(self.transformer_blocks, device)
        options.update(total_blocks=len(self.transformer_blocks), block_type="double")
        for index, block in enumerate(blocks):
            options["block_index"] = index
            bias = key_bias if self.text_mask == "every_block" or index == 0 else None
            if ("double_block", index) in replace:
                def original(args, block=block):
                    out_img, out_txt = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"))
                    return {"img": out_img, "txt": out_txt}

                out = replace[("double_block", index)]({"img": img, "txt": txt, "vec": silu_temb, "pe": rope, "attn_mask": bias,
                                                         "transformer_options": options}, {"original_block": original})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, silu_temb, rope, bias)
            for patch in patches.get("double_block", ()):
                out = patch({"img": img, "txt": txt, "x": x, "block_index": index, "transformer_options": options})
                img, txt = out["img"], out["txt"]
        return self.proj_out(self.norm_out(img, silu_temb))


def _key_bias(text_mask: torch.Tensor, n_img: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, n_img + S]: -inf on padded text keys, none on image keys."""
    b = text_mask.shape[0]
    keep = torch.cat([torch.ones(b, n_img, dtype=torch.bool, device=text_mask.device), text_mask], dim=1)
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    return bias[:, None, None, :]
