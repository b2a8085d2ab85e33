#!/usr/bin/env bash
# Everything that needs a GPU, in one run, for a session lent a device machine: the whole test suite on
# CUDA (the cuda- and slow-marked tests included), then the real-size benchmarks (GGUF decoding in each forward
# among them: bench_gguf.py at 1024² against the same weights dequantised once). Each result goes to $OUT (default
# ./gpu_out) and one summary file, $OUT/summary.txt, collects them all.
#
# The device machine has no internet but has torch, transformers, safetensors, einops, tiktoken, pillow
# and pytest. What else the tests need travels with the repository, prepared here:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .gpu_wheels comfy-kitchen tokenizers \
#       gguf pyyaml requests urllib3 idna charset-normalizer certifi tqdm
#   pip wheel --no-deps -w .gpu_wheels "git+https://github.com/huggingface/diffusers@d004842010be438a786e851450e7125780ae6c8e"
# (the second is diffusers with the Lens port, the reference that bench_vs_reference.py runs; its pull request
# is not in a release), then comfy-kitchen's pure-Python part is unpacked into .gpu_site (its compiled *.so and
# backends/hip dropped: too large to carry, and its eager backend is all the tests use) and put on PYTHONPATH;
# the other wheels are installed from .gpu_wheels when present.
# Set QUICK=1 for a smoke run (small sizes; what a CPU machine can do to test this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu_wheels ] && python -m pip install -q --no-index --no-deps --find-links .gpu_wheels .gpu_wheels/*.whl > "$OUT/pip.txt" 2>&1

step() {  # step NAME COMMAND...: run, keep its output, put its last lines in the summary
    local name=$1; shift
    local started=$SECONDS
    "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    { echo "== $name (exit $rc, $((SECONDS - started)) s)"; tail -n 12 "$OUT/$name.txt"; echo; } >> "$SUMMARY"
}

: > "$SUMMARY"
{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; else echo "no nvidia-smi"; fi
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; echo; } >> "$SUMMARY"
if [ "${QUICK:-0}" = 1 ]; then
    DEV=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    step tests python -m pytest -q -x tests/test_devices.py tests/test_cuda.py
    step dit python bench/bench_dit.py --device "$DEV" --blocks 2 --size 256 --dtype fp32 --mode fp8_fast --batch 2
    step sampling python bench/bench_sampling.py --device "$DEV" --blocks 2 --sizes 256 --lens-steps 2 --mode compiled
    step sampling_swap python bench/bench_sampling.py --device "$DEV" --blocks 2 --sizes 256 --lens-steps 2 --blocks-on-cpu 1 --separate-cfg
    step lora python bench/bench_lora.py --device "$DEV" --blocks 2 --size 256 --ranks 16
    step dit_vs_reference python bench/bench_vs_reference.py --device "$DEV" --blocks 1 --size 256 --batch 2 --repeats 2
    step gguf python bench/bench_gguf.py --device "$DEV" --blocks 1 --size 256 --repeats 1 --types Q8_0 Q4_K
else
    # Most wanted first: each step's output is kept even if the device time runs out later.
    step tests python -m pytest -q -rs -m "slow or not slow" tests
    step sampling_eager python bench/bench_sampling.py --device cuda --mode eager
    step sampling_compiled python bench/bench_sampling.py --device cuda --mode compiled
    step sampling_compiled_cudagraphs_1024 python bench/bench_sampling.py --device cuda --sizes 1024 --mode compiled_cudagraphs
    step sampling_separate_cfg python bench/bench_sampling.py --device cuda --separate-cfg
    step gguf_1024 python bench/bench_gguf.py --device cuda --blocks 8 --size 1024
    step sampling_swap24_1440 python bench/bench_sampling.py --device cuda --sizes 1440 --blocks-on-cpu 24
    step sampling_fp8_swap24_1440 python bench/bench_sampling.py --device cuda --sizes 1440 --blocks-on-cpu 24 --mode fp8_fast
    for batch in 1 2; do
        step "dit_vs_reference_1024_b${batch}" python bench/bench_vs_reference.py --device cuda --size 1024 --batch $batch
    done
    for size in 1024 1440; do
        for batch in 1 2; do
            step "dit_${size}_b${batch}_eager" python bench/bench_dit.py --device cuda --blocks 48 --size $size --batch $batch --mode eager
        done
    done
    step dit_1024_b1_compiled python bench/bench_dit.py --device cuda --blocks 48 --size 1024 --batch 1 --mode compiled
    step dit_1024_b2_fp8_fast python bench/bench_dit.py --device cuda --blocks 48 --size 1024 --batch 2 --mode fp8_fast
    step vae python bench/bench_vae.py --device cuda
    step lora python bench/bench_lora.py --device cuda --ranks 16 64
    LOAD_DIR=${LOAD_DIR:-/tmp/lens_load_bench}
    step load_all_and_moves python bench/bench_load_all.py "$LOAD_DIR" --device cuda
    step text_encoder python bench/bench_text_encoder.py "$LOAD_DIR/text_encoder" --device cuda
    step text_encoder_streamed python bench/bench_text_encoder.py "$LOAD_DIR/text_encoder" --device cuda --stream-experts
fi
cat "$SUMMARY"
