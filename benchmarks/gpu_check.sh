#!/usr/bin/env bash
# `make gpu-check`: one prepared command for a machine with a GPU and torch/triton already
# installed (no network, no venv). Installs the package with --no-deps, runs the whole test
# suite on CUDA tensors in parallel, then the short benchmark (the pytest-benchmark cases
# marked quick, and the host cases: benchmarks/bench.py), then the fast launch path's tests and
# quick benchmark (CBAM_FUSED_FAST_LAUNCH=1), and prints a one-screen summary.
# Under 6 minutes on an H100/H200. Logs go to $OUT when it is set (the device tool's
# machine), else benchmarks/results/gpu-check/; the benchmark's saved run (JSON, tables,
# plot) to <that folder>/<gpu>/.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
JOBS="${JOBS:-8}"

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
    || { echo "pip install -e . failed (see install.log); using PYTHONPATH"; export PYTHONPATH="$PWD"; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
} >"$LOGS/gpu.txt" 2>&1

start=$(date +%s)
CBAM_TEST_DEVICE=cuda timeout 270 python3 -m pytest tests -q -n "$JOBS" -p no:cacheprovider \
    --timeout 150 -rfEs >"$LOGS/cuda_tests.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

timeout 200 python3 benchmarks/bench.py -m "quick or host" --out "$LOGS" --log --time-limit 120 \
    >"$LOGS/bench.log" 2>&1
bench_rc=$?

# The fast launch path (cbam_fused/launch.py, opt-in until this passes): the tests that
# compare its bits with the JIT path's, and the numerics tests with every call on it;
# then the quick cbam_fused cases on it (host enqueue time next to the run above).
start=$(date +%s)
CBAM_TEST_DEVICE=cuda CBAM_FUSED_FAST_LAUNCH=1 timeout 150 python3 -m pytest -q -n "$JOBS" \
    -p no:cacheprovider --timeout 120 -rfEs tests/test_cuda_fast_launch.py \
    tests/test_against_reference.py tests/test_gradcheck.py tests/test_determinism_and_memory.py \
    tests/test_torch_integration.py >"$LOGS/cuda_tests_fast_launch.log" 2>&1
fast_rc=$?
fast_s=$(( $(date +%s) - start ))
CBAM_FUSED_FAST_LAUNCH=1 timeout 100 python3 benchmarks/bench.py -m quick --out "$LOGS/fast_launch" \
    --log --time-limit 70 -- -k cbam_fused >"$LOGS/bench_fast_launch.log" 2>&1

echo "== gpu-check: $(head -n 2 "$LOGS/gpu.txt" | paste -sd ' ' -)"
echo "== CUDA suite (rc $tests_rc, ${tests_s} s):"
grep -E "^(FAILED|ERROR)" "$LOGS/cuda_tests.log" | cut -c1-160 | head -n 15
grep -E "^SKIPPED" "$LOGS/cuda_tests.log" | cut -c1-160 | sort | uniq | head -n 8
tail -n 1 "$LOGS/cuda_tests.log"
echo "== benchmark (rc $bench_rc):"
sed -n '/^== block/,/^== host/p' "$LOGS/bench.log" | cut -c1-200 | head -n 40
echo "== fast launch path: CUDA tests (rc $fast_rc, ${fast_s} s):"
grep -E "^(FAILED|ERROR)" "$LOGS/cuda_tests_fast_launch.log" | cut -c1-160 | head -n 10
tail -n 1 "$LOGS/cuda_tests_fast_launch.log"
echo "== fast launch path: benchmark"
sed -n '/^== block/,/^== host/p' "$LOGS/bench_fast_launch.log" | cut -c1-200 | head -n 20
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$fast_rc" -eq 0 ]
