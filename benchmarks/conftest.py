"""pytest-benchmark set-up of benchmarks/: the import path, the device, the marks, what
each saved run records about the machine, and the compile-time budget.

Without a CUDA device the Triton interpreter is switched on (before triton is imported),
so the host benchmarks' CPU tensors go through the kernel path (with stubbed kernels),
and the GPU cases skip unless CBAM_BENCH_DEVICE=cpu asks for a plumbing dry run (which
switches the interpreter on, on any machine: cbam_fused runs its kernels there).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402  (torch does not import triton: the flag below still applies)

if not torch.cuda.is_available() or os.environ.get("CBAM_BENCH_DEVICE") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import machine  # noqa: E402
from save_partial import pytest_sessionfinish  # noqa: E402,F401  (a hook: pytest finds it here)

MARKS = {
    "gpu": "a timed case of the block on the device (skips without CUDA)",
    "compile": "a torch.compile implementation (compiles before timing)",
    "headline": "the README's speed table",
    "quick": "the short benchmark of make gpu-check",
    "host": "host-side cost, measured on any machine",
}


def pytest_addoption(parser):
    parser.addoption("--bench-compile-budget", type=float, default=None, metavar="SECONDS",
                     help="skip the remaining torch.compile cases once their first calls "
                          "(compilation) have taken this many seconds in all")


def pytest_configure(config):
    for name, text in MARKS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine.stamp())


@pytest.fixture(scope="session")
def bench_device():
    wanted = os.environ.get("CBAM_BENCH_DEVICE")
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (CBAM_BENCH_DEVICE=cpu runs a plumbing dry run on the CPU)")
    return torch.device("cuda")


class CompileBudget:
    def __init__(self, seconds):
        self.seconds, self.spent = seconds, 0.0

    def check(self):
        if self.seconds is not None and self.spent >= self.seconds:
            pytest.skip(f"compile budget spent ({self.spent:.0f} s of {self.seconds:.0f} s)")

    def spend(self, seconds):
        self.spent += seconds


@pytest.fixture(scope="session")
def compile_budget(request):
    return CompileBudget(request.config.getoption("--bench-compile-budget"))
