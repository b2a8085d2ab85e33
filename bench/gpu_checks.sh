#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (for a session lent a device machine):
# the CUDA tests, then the denoiser and VAE benchmarks at real size. Results go to $OUT (default ./gpu_out).
# The machine has no internet: carry a wheelhouse made here with
#   pip download -d wheels einops tiktoken tokenizers comfy-kitchen safetensors pytest
# and it is installed from there when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
[ -d wheels ] && pip install -q --no-index --find-links wheels einops tiktoken tokenizers comfy-kitchen safetensors pytest
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -m pytest -q tests/test_cuda.py tests/test_dit.py tests/test_sampling.py > "$OUT/tests.txt" 2>&1
python bench/bench_dit.py --device cuda --blocks 48 --size 1024 --dtype bf16 > "$OUT/dit_1024.json" 2> "$OUT/dit_1024.err"
python bench/bench_dit.py --device cuda --blocks 48 --size 1440 --dtype bf16 > "$OUT/dit_1440.json" 2> "$OUT/dit_1440.err"
python bench/bench_vae.py --device cuda > "$OUT/vae.json" 2> "$OUT/vae.err"
tail -n 3 "$OUT"/*.txt "$OUT"/*.json
