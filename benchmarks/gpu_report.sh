#!/usr/bin/env bash
# One call on a GPU machine that already has torch, triton and pytest (no venv, no network):
# the CUDA test suite, then the benchmark report. Results land in benchmarks/results/<gpu>/
# (or $OUT/<gpu>/ when OUT is set, as on the device tool's machine).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"

CBAM_TEST_DEVICE=cuda timeout 240 python3 -m pytest tests -q -n 4 -p no:cacheprovider \
    2>&1 | tee "$RESULTS/cuda_tests.log" | tail -25
timeout 330 python3 benchmarks/run.py --out "$RESULTS" ${BENCH_ARGS:---quick} 2>&1 | tee "$RESULTS/bench.log"
