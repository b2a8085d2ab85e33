"""Text-encoder benchmark: a full-size GPT-OSS-20B MXFP4 checkpoint with random weights in the real HF
layout (3 shards + index + config.json, ~13 GB, written once), then a 300-token prompt encoded in a child
process: wall time and peak RSS (CPU target: under 16 GB; dequantised bf16 needs ~40 GB), and on CUDA the
peak GPU memory too.

    python bench/bench_text_encoder.py /tmp/lens_te_bench                 # on the CPU
    python bench/bench_text_encoder.py /tmp/lens_te_bench --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_writer import write_streaming  # noqa: E402

HIDDEN, LAYERS, HEADS, KV, HEAD_DIM, EXPERTS, VOCAB = 2880, 24, 64, 8, 64, 32, 201088


def layer_tensors(i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    bf16, u8 = torch.bfloat16, torch.uint8
    return {
        p + "input_layernorm.weight": (bf16, (HIDDEN,)), p + "post_attention_layernorm.weight": (bf16, (HIDDEN,)),
        p + "self_attn.q_proj.weight": (bf16, (HEADS * HEAD_DIM, HIDDEN)), p + "self_attn.q_proj.bias": (bf16, (HEADS * HEAD_DIM,)),
        p + "self_attn.k_proj.weight": (bf16, (KV * HEAD_DIM, HIDDEN)), p + "self_attn.k_proj.bias": (bf16, (KV * HEAD_DIM,)),
        p + "self_attn.v_proj.weight": (bf16, (KV * HEAD_DIM, HIDDEN)), p + "self_attn.v_proj.bias": (bf16, (KV * HEAD_DIM,)),
        p + "self_attn.o_proj.weight": (bf16, (HIDDEN, HEADS * HEAD_DIM)), p + "self_attn.o_proj.bias": (bf16, (HIDDEN,)),
        p + "self_attn.sinks": (bf16, (HEADS,)),
        p + "mlp.router.weight": (bf16, (EXPERTS, HIDDEN)), p + "mlp.router.bias": (bf16, (EXPERTS,)),
        p + "mlp.experts.gate_up_proj_blocks": (u8, (EXPERTS, 2 * HIDDEN, HIDDEN // 32, 16)),
        p + "mlp.experts.gate_up_proj_scales": (u8, (EXPERTS, 2 * HIDDEN, HIDDEN // 32)),
        p + "mlp.experts.gate_up_proj_bias": (bf16, (EXPERTS, 2 * HIDDEN)),
        p + "mlp.experts.down_proj_blocks": (u8, (EXPERTS, HIDDEN, HIDDEN // 32, 16)),
        p + "mlp.experts.down_proj_scales": (u8, (EXPERTS, HIDDEN, HIDDEN // 32)),
        p + "mlp.experts.down_proj_bias": (bf16, (EXPERTS, HIDDEN)),
    }


def make(name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    if name.endswith("_scales"):
        return torch.randint(118, 124, shape, dtype=torch.uint8)  # E8M0: 2^-9 .. 2^-4
    if "layernorm" in name or name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape) * 0.02).to(dtype)


def write_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards = [
        {"model.embed_tokens.weight": (torch.bfloat16, (VOCAB, HIDDEN))} | {k: v for i in range(0, 8) for k, v in layer_tensors(i).items()},
        {k: v for i in range(8, 16) for k, v in layer_tensors(i).items()},
        {k: v for i in range(16, 24) for k, v in layer_tensors(i).items()} | {"model.norm.weight": (torch.bfloat16, (HIDDEN,))},
    ]
    weight_map = {}
    for n, tensors in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-00003.safetensors"
        write_streaming(folder / name, tensors, make)
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt_oss", "num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "intermediate_size": HIDDEN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM, "num_local_experts": EXPERTS,
        "num_experts_per_tok": 4, "sliding_window": 128, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "swiglu_limit": 7.0,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(LAYERS)],
        "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                  "original_max_position_embeddings": 4096, "truncate": False},
    }))


def child(folder: str, device: str, stream_experts: bool) -> None:
    from lens_core import encode_prompts, load_text_encoder, load_tokenizer
    from lens_core.text.prompt import PREFIX_TOKENS, render_and_tokenize

    start = time.perf_counter()
    encoder = load_text_encoder(folder, device="cpu" if stream_experts else device)
    if stream_experts:
        encoder.set_expert_streaming(True)
        encoder.place(device)
    loaded = time.perf_counter()
    tokenizer = load_tokenizer()
    prompt = " ".join(["a quiet harbour town at dawn, fishing boats, gulls, mist over the water"] * 18)
    ids = render_and_tokenize(tokenizer, prompt)
    result = encode_prompts(encoder, tokenizer, [prompt])
    done = time.perf_counter()
    report = {"device": device, "stream_experts": stream_experts, "dtype": str(encoder.dtype), "prompt_tokens": len(ids) - PREFIX_TOKENS - 22,
              "sequence_tokens": len(ids), "features": list(result.features.shape), "load_seconds": round(loaded - start, 1),
              "encode_seconds": round(done - loaded, 2),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.startswith("cuda"):
        report["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-experts", action="store_true", help="expert banks stay in CPU memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(str(args.folder), args.device, args.stream_experts)
    if not (args.folder / "config.json").exists():
        start = time.perf_counter()
        write_checkpoint(args.folder)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    subprocess.run([sys.executable, __file__, str(args.folder), "--child", "--device", args.device]
                   + (["--stream-experts"] if args.stream_experts else []), check=True)


if __name__ == "__main__":
    main()
