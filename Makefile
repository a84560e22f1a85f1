# Two entry points (README): `make run` (the main job) and `make test` (the test suite).
# Both create .venv and install the pinned requirements into it first.
# `make gpu-check` and `make gpu-bench` are for a GPU machine that already has torch, triton
# and pytest (no venv, no network).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: setup run test test-long aot bench bench-compare gpu-check gpu-bench clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) benchmarks/run.py

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist worksteal tests

# The property-based test with many fresh examples (default 500; CBAM_HYPOTHESIS_EXAMPLES=N).
test-long: $(STAMP)
	CBAM_HYPOTHESIS_EXAMPLES=$${CBAM_HYPOTHESIS_EXAMPLES:-500} CBAM_HYPOTHESIS_RANDOM=1 \
		$(PY) -m pytest -n $(JOBS) tests/test_property.py

aot: $(STAMP)
	$(PY) -m cbam_fused.aot

# The pytest-benchmark suite (benchmarks/bench_*.py), saved into benchmarks/results/<device>/.
# BENCH_MARKS selects cases by mark (cases.py): headline, quick, host, "not compile", ...;
# empty runs everything (on a GPU: hours, the torch.compile cases dominate).
BENCH_MARKS ?=
bench: $(STAMP)
	$(PY) benchmarks/bench.py -m "$(BENCH_MARKS)"

# pytest-benchmark compare over every saved run: benchmarks/results/compare/.
bench-compare: $(STAMP)
	$(PY) benchmarks/bench.py --compare

# On a GPU machine: CUDA test suite + short benchmark, one-screen summary, logs in $OUT (< 6 min).
gpu-check:
	bash benchmarks/gpu_check.sh

# On a GPU machine: the benchmark suite with the machine's python (default: the README's
# headline cases), into $OUT/<gpu>/ when OUT is set, else benchmarks/results/<gpu>/.
GPU_BENCH_MARKS ?= headline
gpu-bench:
	python3 benchmarks/bench.py -m "$(GPU_BENCH_MARKS)" --out "$${OUT:-benchmarks/results}"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
