"""Tiny GPT-OSS models for tests: transformers' GptOssModel as the reference, written in the HF dense,
HF MXFP4 (golden) and Comfy-Org NVFP4 layouts; and a tokenizer.json built offline from the ranks."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import comfy_kitchen
import torch
from model_files import comfy_quant_tensor
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import GptOssConfig as HFConfig
from transformers import GptOssModel
from transformers.convert_slow_tokenizer import TikTokenConverter

from lens_core.text.tokenizer import BUNDLED_RANKS, HARMONY_SPECIAL_TOKENS, O200K_PATTERN


def hf_reference(seed=0, layers=3, experts=6, top_k=3, window=3, vocab=300):
    torch.manual_seed(seed)
    cfg = HFConfig(num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=top_k, vocab_size=vocab,
                   hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                   sliding_window=window, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    cfg._attn_implementation = "eager"
    model = GptOssModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name or name == "norm.weight" else 0.08 * torch.randn_like(p))
    return model, cfg


def expert_banks(encoder) -> list:
    """The encoder's expert banks, every layer's gate_up and down."""
    return [bank for layer in encoder.layers for bank in (layer.mlp.gate_up, layer.mlp.down)]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 blocks [..., G, 16] + scales [..., G] -> float32 values [..., G * 32] (the pack's decoder)."""
    from lens_core.quant.gguf_blocks import mxfp4_values

    return mxfp4_values(blocks, scales, torch.float32, interleaved=True).flatten(-2)


def hf_features(model, ids, mask, layers):
    captured = {}
    hooks = [model.layers[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i in layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return [captured[i] for i in layers]


def write_hf_dense(model, cfg, folder: Path, dtype=torch.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model." + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(cfg.to_json_string())
    return folder


def nvfp4_bank(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """[E, out, in] float -> Comfy-Org NVFP4 bank tensors (comfy-kitchen's quantiser and layout)."""
    packed, scales, globals_ = [], [], []
    for w in weights:
        per_tensor = (w.abs().max() / (448.0 * 6.0)).float().reshape(())
        q, s = comfy_kitchen.quantize_nvfp4(w.float().contiguous(), per_tensor)
        packed.append(q), scales.append(s), globals_.append(per_tensor)
    return {"weight": torch.stack(packed), "weight_scale": torch.stack(scales), "weight_scale_2": torch.stack(globals_),
            "comfy_quant": comfy_quant_tensor("nvfp4")}


def write_comfy_nvfp4(model, path: Path, tokenizer_json: str | None = None) -> dict[str, torch.Tensor]:
    """Bare keys, NVFP4 expert banks [E, out, in], bf16 elsewhere; returns the dequantised float state."""
    out, dequantised = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            bank = nvfp4_bank(v.transpose(1, 2))
            out.update({f"{k}.{suffix}": t for suffix, t in bank.items()})
            deq = torch.stack([comfy_kitchen.dequantize_nvfp4(bank["weight"][e], bank["weight_scale_2"][e], bank["weight_scale"][e],
                                                              output_type=torch.float32)
                               for e in range(v.shape[0])])
            dequantised[k] = deq.transpose(1, 2).contiguous()
        elif k.endswith("_bias") and ".experts." in k:
            out[k.replace("_proj_bias", "_proj.bias")] = v.to(torch.bfloat16)
            dequantised[k] = v.to(torch.bfloat16).float()
        else:
            out[k] = v.to(torch.bfloat16)
            dequantised[k] = v.to(torch.bfloat16).float()
    if tokenizer_json is not None:
        out["tokenizer_json"] = torch.tensor(list(tokenizer_json.encode("utf-8")), dtype=torch.uint8)
    save_file(out, str(path))
    return dequantised


def build_tokenizer_json(tmp: Path) -> Path:
    """GPT-OSS's tokenizer.json rebuilt from the bundled ranks with transformers' TikTokenConverter."""
    ranks = tmp / "o200k_base.tiktoken"
    with gzip.open(BUNDLED_RANKS, "rb") as src, open(ranks, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=O200K_PATTERN).converted()
    names = {v: k for k, v in HARMONY_SPECIAL_TOKENS.items()}
    tokenizer.add_special_tokens([AddedToken(names.get(i, f"<|reserved_{i}|>"), special=True, normalized=False) for i in range(199998, 200013)])
    path = tmp / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def golden_te_folder(golden: Path, tmp: Path) -> Path:
    """The golden MXFP4 model as a Microsoft-style text_encoder/ folder (weights + config.json)."""
    folder = tmp / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(golden / "te_tiny_mxfp4.safetensors", folder / "model-00001-of-00001.safetensors")
    shutil.copy(golden / "te_tiny_config.json", folder / "config.json")
    return folder


def write_llama_cpp_gguf(model, cfg, path: Path, seed: int = 0, fuse_gate_up: bool = False, tokens: list[str] | None = None,
                         fuse_qkv: bool = False) -> None:
    """`model` as llama.cpp's converter writes GPT-OSS: its names (gguf's own tensor map), the config as metadata, the
    experts as MXFP4 blocks (gate and up split, or fused gate-first), q, k and v split or fused (`--fuse-qkv`: one
    `attn_qkv` tensor, q rows first), the rest float32. The experts get random MXFP4
    weights, which are also set into `model` (dequantised by the gguf package), so `model` stays the reference."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    from model_files import finish_gguf, random_blocks

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    for add, value in ((writer.add_block_count, cfg.num_hidden_layers), (writer.add_embedding_length, cfg.hidden_size),
                       (writer.add_head_count, cfg.num_attention_heads), (writer.add_head_count_kv, cfg.num_key_value_heads),
                       (writer.add_key_length, cfg.head_dim), (writer.add_expert_count, cfg.num_local_experts),
                       (writer.add_expert_used_count, cfg.num_experts_per_tok), (writer.add_sliding_window, cfg.sliding_window),
                       (writer.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
                       (writer.add_rope_scaling_factor, cfg.rope_parameters["factor"]),
                       (writer.add_rope_scaling_orig_ctx_len, cfg.rope_parameters["original_max_position_embeddings"]),
                       (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps), (writer.add_expert_feed_forward_length, cfg.intermediate_size)):
        add(value)
    if tokens is not None:
        writer.add_token_list(tokens)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, cfg.num_hidden_layers)
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    experts, hidden, inner = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size

    def random_mxfp4(rows, cols):
        raw = random_blocks(39, experts * rows, cols, rng, scale=2 ** -6).reshape(experts, rows, -1)
        return raw, torch.from_numpy(dequantize(raw, mxfp4).copy())

    state = model.state_dict()
    for name, tensor in state.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if fuse_qkv and ".self_attn.q_proj." in name:
            fused = torch.cat([state[name.replace("q_proj", proj)] for proj in ("q_proj", "k_proj", "v_proj")])
            writer.add_tensor(f"blk.{layer}.attn_qkv.{name.rsplit('.', 1)[1]}", fused.float().numpy())
            continue
        if fuse_qkv and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name):
            continue
        if name.endswith("experts.gate_up_proj"):
            (gate_raw, gate), (up_raw, up) = random_mxfp4(inner, hidden), random_mxfp4(inner, hidden)
            tensor.copy_(torch.stack([gate, up], dim=2).flatten(1, 2).transpose(1, 2))  # HF: [E, in, 2*out], rows interleaved
            if fuse_gate_up:
                writer.add_tensor(f"blk.{layer}.ffn_gate_up_exps.weight", np.concatenate([gate_raw, up_raw], axis=1), raw_dtype=mxfp4)
            else:
                writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", gate_raw, raw_dtype=mxfp4)
                writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", up_raw, raw_dtype=mxfp4)
        elif name.endswith("experts.down_proj"):
            raw, values = random_mxfp4(hidden, inner)
            tensor.copy_(values.transpose(1, 2))
            writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", raw, raw_dtype=mxfp4)
        elif name.endswith("experts.gate_up_proj_bias"):
            gate, up = tensor[..., ::2].numpy(), tensor[..., 1::2].numpy()
            if fuse_gate_up:
                writer.add_tensor(f"blk.{layer}.ffn_gate_up_exps.bias", np.concatenate([gate, up], axis=-1))
            else:
                writer.add_tensor(f"blk.{layer}.ffn_gate_exps.bias", np.ascontiguousarray(gate))
                writer.add_tensor(f"blk.{layer}.ffn_up_exps.bias", np.ascontiguousarray(up))
        elif name.endswith("experts.down_proj_bias"):
            writer.add_tensor(f"blk.{layer}.ffn_down_exps.bias", tensor.numpy())
        else:
            key = "model." + name + (".weight" if name.endswith("sinks") else "")
            writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    finish_gguf(writer)


def write_hf_mxfp4_folder(folder: Path, layers: int = 2, seed: int = 0):
    """A tiny GPT-OSS as OpenAI/Microsoft publish it, for converters: MXFP4 expert blocks and scales, `model.` keys,
    config.json with the mxfp4 quantization_config, tokenizer.json (the real vocabulary size, 201,088, which
    llama.cpp's converter requires). Returns transformers' GptOssModel with the experts dequantised (the reference)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    model, cfg = hf_reference(seed=seed, layers=layers, experts=4, top_k=2, window=4, vocab=201088)
    state = {}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            shapes = (("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size), ("down_proj", cfg.hidden_size, cfg.intermediate_size))
            for proj, rows, cols in shapes:
                blocks = torch.randint(0, 256, (cfg.num_local_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=generator)
                scales = torch.randint(120, 123, (cfg.num_local_experts, rows, cols // 32), dtype=torch.uint8, generator=generator)
                state[f"model.layers.{i}.mlp.experts.{proj}_blocks"], state[f"model.layers.{i}.mlp.experts.{proj}_scales"] = blocks, scales
                getattr(layer.mlp.experts, proj).copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))  # HF: [E, in, out]
    dense = {k: v for k, v in model.state_dict().items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    state.update({"model." + k: v.contiguous() for k, v in dense.items()})
    state["lm_head.weight"] = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads(cfg.to_json_string())
    config.update(architectures=["GptOssForCausalLM"], quantization_config={"quant_method": "mxfp4"})
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizer_json(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return model
