"""An independent, deliberately plain re-implementation of the Lens DiT, used only by tests.

Written from the description in docs/architecture.md (The denoiser) in a different style from lens_core (complex-number RoPE, explicit
softmax, one sample at a time, state dict indexed directly), so that agreeing with it on shapes the
goldens do not cover says something.
"""

import math

import torch


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _lin(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _rope_complex(pos, axes=(8, 28, 28)):
    parts = []
    for a, d in enumerate(axes):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        parts.append(torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos[:, a:a + 1].double() * freqs))
    return torch.cat(parts, -1)


def _rotate(x, cis):  # x [heads, L, 64]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * cis).reshape(x.shape).float()


def reference_forward(sd, x, sigma, text, mask, h, w, heads, every_block=True):
    """One sample: x [h*w, 128], sigma float, text [S, layers, C], mask [S] bool.

    every_block: mask padded text keys in every block (ComfyUI native); False: in the first block only
    (the diffusers port)."""
    hidden = sd["img_in.weight"].shape[0]
    t = torch.tensor(float(sigma)) * 1000
    k = torch.arange(128, dtype=torch.float32)
    ang = t * torch.exp(-math.log(10000) * k / 128)
    emb = torch.cat([ang.cos(), ang.sin()])
    time_hidden = torch.nn.functional.silu(_lin(sd, "time_text_embed.timestep_embedder.linear_1", emb))
    temb = _lin(sd, "time_text_embed.timestep_embedder.linear_2", time_hidden)
    img = _lin(sd, "img_in", x)
    layers = text.shape[1]
    txt = _lin(sd, "txt_in", torch.cat([_rms(text[:, i], sd[f"txt_norm.{i}.weight"], 1e-5) for i in range(layers)], -1))
    S = text.shape[0]
    pos = []
    for r in range(h):
        for c in range(w):
            pos.append([0, r - (h - h // 2), c - (w - w // 2)])
    s0 = max(h // 2, w // 2)
    pos += [[s0 + j] * 3 for j in range(S)]
    cis = _rope_complex(torch.tensor(pos, dtype=torch.float32))
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    silu_t = torch.nn.functional.silu(temb)
    for b in range(n_blocks):
        p = f"transformer_blocks.{b}."
        im = _lin(sd, p + "img_mod.1", silu_t).chunk(6)
        tm = _lin(sd, p + "txt_mod.1", silu_t).chunk(6)
        a_img = _rms(img, sd[p + "img_norm1.weight"], 1e-6) * (1 + im[1]) + im[0]
        a_txt = _rms(txt, sd[p + "txt_norm1.weight"], 1e-6) * (1 + tm[1]) + tm[0]
        qi, ki, vi = _lin(sd, p + "attn.img_qkv", a_img).view(-1, 3, heads, 64).unbind(1)
        qt, kt, vt = _lin(sd, p + "attn.txt_qkv", a_txt).view(-1, 3, heads, 64).unbind(1)
        q = torch.cat([_rms(qi, sd[p + "attn.norm_q.weight"], 1e-6), _rms(qt, sd[p + "attn.norm_added_q.weight"], 1e-6)]).transpose(0, 1)
        kk = torch.cat([_rms(ki, sd[p + "attn.norm_k.weight"], 1e-6), _rms(kt, sd[p + "attn.norm_added_k.weight"], 1e-6)]).transpose(0, 1)
        v = torch.cat([vi, vt]).transpose(0, 1)
        q, kk = _rotate(q, cis), _rotate(kk, cis)
        logits = q @ kk.transpose(-1, -2) / 8.0
        if every_block or b == 0:
            keep = torch.cat([torch.ones(h * w, dtype=torch.bool), mask])
            logits = logits.masked_fill(~keep, float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, hidden)
        img = img + im[2] * _lin(sd, p + "attn.to_out.0", out[: h * w])
        txt = txt + tm[2] * _lin(sd, p + "attn.to_add_out", out[h * w:])
        for stream, mod, name in ((0, im, "img"), (1, tm, "txt")):
            cur = img if stream == 0 else txt
            m = _rms(cur, sd[p + f"{name}_norm2.weight"], 1e-6) * (1 + mod[4]) + mod[3]
            swish = torch.nn.functional.silu(m @ sd[p + f"{name}_mlp.w1.weight"].T)
            ff = (swish * (m @ sd[p + f"{name}_mlp.w3.weight"].T)) @ sd[p + f"{name}_mlp.w2.weight"].T
            if stream == 0:
                img = cur + mod[5] * ff
            else:
                txt = cur + mod[5] * ff
    scale, shift = _lin(sd, "norm_out.linear", silu_t).chunk(2)
    y = torch.nn.functional.layer_norm(img, (hidden,), eps=1e-6) * (1 + scale) + shift
    return _lin(sd, "proj_out", y)
