"""Test device selection. Default: CPU tensors with the Triton kernels in the interpreter.

CBAM_TEST_DEVICE=cuda runs the same tests on a GPU with compiled kernels
(`make gpu-report`). The interpreter flag must be set before triton is imported.
"""
import os

DEVICE = os.environ.get("CBAM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
