"""Loading llama.cpp's GPT-OSS-20B GGUF at its real shapes: peak memory and time against the file's own cost.

    python bench/bench_gguf_encoder.py --folder /tmp    # writes, loads and deletes a 12 GB file

All 24 layers: the loader refuses a GPT-OSS-20B-wide file with fewer (a missing shard would look the same).

The file is laid out as ggml-org's gpt-oss-20b-mxfp4.gguf: expert banks [32, 2880, 2880] in MXFP4, the embedding,
the output head and the attention matrices in Q8_0, norms, biases and sinks in F32; random values (loading does not
depend on them). It is written piece by piece, then loaded in a child process (bf16 compute dtype) whose peak
resident memory is its own. Printed (one JSON line):

- `read_seconds`: reading the file's bytes once from a warm page cache (the baseline of the load-time goal, <= 2x);
- `read_into_memory_seconds`: the same bytes read into memory that stays allocated (see `read_into_memory`);
- `load_seconds`, `load_vs_read`, `load_vs_read_into_memory`;
- `weight_gb`: the loaded model's bytes; `largest_tensor_gb`; `peak_rss_gb` and `peak_rss_over_goal_gb`, the peak
  less (weights + largest tensor + 0.5 GB): the memory goal holds when that is <= 0.
- `per_expert_ms_*`: decoding one [2880, 2880] MXFP4 expert to bf16, in llama.cpp's and in OpenAI's (HF) layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import peak_rss_gb  # noqa: E402
from bench_identity import read_once  # noqa: E402
from model_files import random_blocks  # noqa: E402

from lens_core.quant.gguf_blocks import mxfp4_values  # noqa: E402

LAYERS, HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, VOCAB = 24, 2880, 64, 8, 64, 32, 201088
MXFP4, Q8_0 = 39, 8


def tensors(layers: int):
    """(name, shape, ggml type or None for F32) of every tensor, in file order."""
    yield "token_embd.weight", (VOCAB, HIDDEN), Q8_0
    for i in range(layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (HIDDEN,), None
        for name, rows in (("attn_q", HEADS * HEAD_DIM), ("attn_k", KV * HEAD_DIM), ("attn_v", KV * HEAD_DIM)):
            yield p + name + ".weight", (rows, HIDDEN), Q8_0
            yield p + name + ".bias", (rows,), None
        yield p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), Q8_0
        yield p + "attn_output.bias", (HIDDEN,), None
        yield p + "attn_sinks.weight", (HEADS,), None
        yield p + "post_attention_norm.weight", (HIDDEN,), None
        yield p + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), None
        yield p + "ffn_gate_inp.bias", (EXPERTS,), None
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            yield p + name + ".weight", (EXPERTS, HIDDEN, HIDDEN), MXFP4
            yield p + name + ".bias", (EXPERTS, HIDDEN), None
    yield "output_norm.weight", (HIDDEN,), None
    yield "output.weight", (VOCAB, HIDDEN), Q8_0


def data(shape, qtype, rng) -> np.ndarray:
    if qtype is None:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    rows = int(np.prod(shape[:-1]))
    return random_blocks(qtype, rows, shape[-1], rng, scale=2 ** -6).reshape(*shape[:-1], -1)


def write_file(path: Path, layers: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    for add, value in ((writer.add_block_count, layers), (writer.add_embedding_length, HIDDEN), (writer.add_head_count, HEADS),
                       (writer.add_head_count_kv, KV), (writer.add_key_length, HEAD_DIM), (writer.add_expert_count, EXPERTS),
                       (writer.add_expert_used_count, 4), (writer.add_sliding_window, 128), (writer.add_rope_freq_base, 150000.0),
                       (writer.add_rope_scaling_factor, 32.0), (writer.add_rope_scaling_orig_ctx_len, 4096),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_expert_feed_forward_length, HIDDEN)):
        add(value)
    rng = np.random.default_rng(0)
    order = list(tensors(layers))
    for name, shape, qtype in order:
        if qtype is None:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            block = {MXFP4: (32, 17), Q8_0: (32, 34)}[qtype]
            byte_shape = (*shape[:-1], shape[-1] // block[0] * block[1])
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape, qtype in order:
        writer.write_tensor_data(data(shape, qtype, rng))
    writer.close()


def read_into_memory(path: Path) -> float:
    """Every byte of the file read into fresh memory that stays allocated, as any loader that copies (no memory map)
    must: on a machine whose RAM cannot hold both the page cache and the weights, this is the floor."""
    kept = []
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(256 << 20):
            kept.append(chunk)
    seconds = time.perf_counter() - started
    del kept
    return seconds


def child(path: str) -> None:
    from lens_core import load_text_encoder
    from lens_core.placement import weight_bytes

    started = time.perf_counter()
    encoder = load_text_encoder(path, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    largest = max(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()])
    print(json.dumps({"load_seconds": seconds, "weight_bytes": weight_bytes(encoder), "largest_bytes": largest,
                      "peak_rss_gb": peak_rss_gb()}))


def per_expert_ms(interleaved: bool) -> float:
    codes = torch.randint(0, 256, (HIDDEN, HIDDEN // 32, 16), dtype=torch.uint8)
    scales = torch.randint(118, 124, (HIDDEN, HIDDEN // 32), dtype=torch.uint8)
    mxfp4_values(codes, scales, torch.bfloat16, interleaved)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        mxfp4_values(codes, scales, torch.bfloat16, interleaved)
        best = min(best, time.perf_counter() - started)
    return round(best * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "gpt-oss-20b-mxfp4.gguf"
        write_file(path, LAYERS)
        read_once(path)  # warm the page cache
        read_seconds = read_once(path)
        into_memory_seconds = read_into_memory(path)
        read_once(path)
        env = dict(os.environ, LENS_CACHE_DIR=str(Path(folder) / "cache"))
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], stdout=subprocess.PIPE, text=True, check=True, env=env)
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        file_gb = path.stat().st_size / 1e9
    weight_gb, largest_gb = loaded["weight_bytes"] / 1e9, loaded["largest_bytes"] / 1e9
    print(json.dumps({"file_gb": round(file_gb, 2), "read_seconds": round(read_seconds, 2),
                      "read_into_memory_seconds": round(into_memory_seconds, 2),
                      "load_seconds": round(loaded["load_seconds"], 2), "load_vs_read": round(loaded["load_seconds"] / read_seconds, 2),
                      "load_vs_read_into_memory": round(loaded["load_seconds"] / into_memory_seconds, 2),
                      "weight_gb": round(weight_gb, 2), "largest_tensor_gb": round(largest_gb, 2),
                      "peak_rss_gb": loaded["peak_rss_gb"],
                      "peak_rss_over_goal_gb": round(loaded["peak_rss_gb"] - (weight_gb + largest_gb + 0.5), 2),
                      "per_expert_ms_llama_cpp_layout": per_expert_ms(False), "per_expert_ms_hf_layout": per_expert_ms(True)}))


if __name__ == "__main__":
    main()
