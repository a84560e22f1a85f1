"""Test device selection. Default: CPU tensors with the Triton kernels in the interpreter.

CBAM_TEST_DEVICE=cuda runs the same tests on a GPU with compiled kernels
(`make gpu-check`). The interpreter flag must be set before triton is imported.

On the CPU the interpreter is made to behave like the compiler where the first GPU
run showed they differ (tests/cuda_preconditions.py): integer arguments equal to 1
arrive in the kernel as plain ints, as compile-time constants do.
"""
import os

DEVICE = os.environ.get("CBAM_TEST_DEVICE", "cpu")
# ultralytics (exports in test_ultralytics_yaml.py) would otherwise try to pip-install the
# optional packages it misses (onnxslim) into the test environment
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if DEVICE == "cpu":
    from cuda_preconditions import specialize_ones_like_the_compiler  # noqa: E402

    specialize_ones_like_the_compiler()


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
