"""Launches per block on a real GPU (issue 11): the CUDA kernels torch.profiler sees for
one forward and one backward of a fused block, training mode, batch-statistics
BatchNorm. The same bounds as tests/test_launches.py holds on the CPU: forward <= 5,
backward <= 7 (ultralytics may add 2)."""
import pytest
import torch

from helpers import make_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="counts CUDA kernels with torch.profiler: needs a GPU")

EXTRA = {"official": 0, "timm": 0, "timm_light": 0, "ultralytics": 2}


def _cuda_kernels(fn):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(EXTRA))
def test_cuda_kernels_per_block(variant, dtype, layout):
    m = make_module(variant, 256, "cuda")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 256, 28, 28, device="cuda", dtype=dtype).to(memory_format=fmt)
    x.requires_grad_()
    g = torch.randn_like(x)
    m(x).backward(g)  # compile and warm up outside the count
    x.grad = None
    m.zero_grad(set_to_none=True)
    state = {}
    fwd = _cuda_kernels(lambda: state.setdefault("out", m(x)))
    bwd = _cuda_kernels(lambda: state["out"].backward(g))
    assert len(fwd) <= 5 + EXTRA[variant], fwd
    assert len(bwd) <= 7 + EXTRA[variant], bwd
