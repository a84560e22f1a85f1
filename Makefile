# Two entry points (README): `make run` (the main job) and `make test` (the test suite).
# Both create .venv and install the pinned requirements into it first.
# `make gpu-check` and `make gpu-report` are for a GPU machine that already has torch, triton
# and pytest (no venv, no network).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: setup run test test-long aot gpu-check gpu-report clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) benchmarks/run.py

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) tests

# The property-based test with many fresh examples (default 500; CBAM_HYPOTHESIS_EXAMPLES=N).
test-long: $(STAMP)
	CBAM_HYPOTHESIS_EXAMPLES=$${CBAM_HYPOTHESIS_EXAMPLES:-500} CBAM_HYPOTHESIS_RANDOM=1 \
		$(PY) -m pytest -n $(JOBS) tests/test_property.py

aot: $(STAMP)
	$(PY) -m cbam_fused.aot

# On a GPU machine: CUDA test suite + short benchmark, one-screen summary, logs in $OUT (< 6 min).
gpu-check:
	bash benchmarks/gpu_check.sh

# On a GPU machine: CUDA test suite + full benchmark report into benchmarks/results/<gpu>/.
gpu-report:
	bash benchmarks/gpu_report.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
