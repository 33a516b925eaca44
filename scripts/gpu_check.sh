#!/usr/bin/env bash
# The GPU checks, in one go: the gpu-marked tests (compiled kernels and the gathered path against the float32
# references, determinism, no host sync, torch.compile; the static cache against the dynamic one, and its decode step
# in a CUDA graph), then benchmarks/bench_kernels.py and
# benchmarks/bench_model.py (whole models, bf16), which write their sections of benchmarks/RESULTS.md. Needs a CUDA
# GPU with Triton; logs go to $OUT (default runs/gpu_check).
#
#   bash scripts/gpu_check.sh            # full benchmark grid
#   bash scripts/gpu_check.sh --quick    # a few benchmark shapes
#
# PYTHON picks the interpreter (default: python3); TESTS_LIMIT_S / BENCH_LIMIT_S / MODEL_BENCH_LIMIT_S cap each phase
# in seconds (default 0: no cap); WORKERS the number of pytest-xdist processes for the tests
# (default 8; 0 runs them in one process). Kernel compilation is CPU-bound and each new test variant autotunes,
# so parallel workers cut the test time several-fold; the benchmark always runs alone.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
workers=${WORKERS:-8}
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
"$python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/device.txt"

parallel=()
if [ "$workers" -gt 0 ] && "$python" -c "import xdist" 2>/dev/null; then parallel=(-n "$workers"); fi
start=$SECONDS
timeout "${TESTS_LIMIT_S:-0}" "$python" -m pytest -m gpu tests/test_kernels_gpu.py tests/test_static_cache.py -rA -p no:cacheprovider "${parallel[@]}" \
    --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_status in $((SECONDS - start)) s" | tee -a "$out/device.txt"

start=$SECONDS
timeout "${BENCH_LIMIT_S:-0}" "$python" benchmarks/bench_kernels.py "$@" 2>&1 | tee "$out/bench.log"
bench_status=${PIPESTATUS[0]}
echo "bench_kernels.py: exit $bench_status in $((SECONDS - start)) s" | tee -a "$out/device.txt"

# Whole models in bf16: UoE (triton, gathered, masked) vs dense Llama vs Mixtral, at d_model 1024 and 2048; decoding
# with the dynamic cache, the static cache, and the static cache in CUDA graphs (torch.compile "reduce-overhead",
# Llama compiled alike), batch 1 and 8.
start=$SECONDS
timeout "${MODEL_BENCH_LIMIT_S:-0}" "$python" benchmarks/bench_model.py --device cuda --repeats "${MODEL_REPEATS:-3}" \
    --shapes "${MODEL_SHAPES:-d1024,2048:4:16/8:5504:16/4:32000:4x1024}" --output "$out/bench_model_cuda.json" \
    --decode_modes "${DECODE_MODES:-dynamic,static,compiled,generate}" --compile_mode reduce-overhead \
    2>&1 | tee "$out/bench_model.log"
model_status=${PIPESTATUS[0]}
echo "bench_model.py: exit $model_status in $((SECONDS - start)) s" | tee -a "$out/device.txt"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$model_status" -eq 0 ]
