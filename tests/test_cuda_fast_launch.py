"""The fast launch path on a GPU (launch.py): the same kernels as Triton's JIT launch, so
the same bits: outputs, every gradient and the BatchNorm buffers equal the JIT path's
exactly, for captured calls, replayed calls, inputs 16-byte aligned or not, and inside
a CUDA graph. Skips without CUDA; on the CPU, tests/test_fast_launch.py checks the key
and the arguments of a replay."""
import copy

import pytest
import torch

import cbam_fused.function as F
from cbam_fused import launch
from helpers import make_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="launches compiled kernels: needs a GPU")


def _misaligned(x):
    """x's values at an address 1 element past a 16-byte boundary, same layout."""
    flat = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    y = flat[1:].view(x.permute(0, 2, 3, 1).shape if not x.is_contiguous() else x.shape)
    if not x.is_contiguous():
        y = y.permute(0, 3, 1, 2)
    y.copy_(x)
    assert y.data_ptr() % 16 != 0 and y.stride() == x.stride()
    return y


def _step(m, x, g):
    x = x.detach().requires_grad_()
    out = m(x)
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in m.named_buffers()}


def _assert_same(a, b, what):
    out_a, dx_a, grads_a, bufs_a = a
    out_b, dx_b, grads_b, bufs_b = b
    assert torch.equal(out_a, out_b), f"{what}: output"
    assert torch.equal(dx_a, dx_b), f"{what}: dx"
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), f"{what}: grad {n}"
    for n in bufs_a:
        assert torch.equal(bufs_a[n], bufs_b[n]), f"{what}: buffer {n}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["official", "timm", "timm_light", "ultralytics"])
def test_fast_launch_matches_jit_launch(monkeypatch, variant, dtype, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(4, 96, 20, 12, device="cuda", dtype=dtype).to(memory_format=fmt)
    g = torch.randn_like(x)
    jit_module = make_module(variant, 96, "cuda").to(dtype)
    fast_module = copy.deepcopy(jit_module)
    inputs = [x, x.clone(), _misaligned(x), x]
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    expected = [_step(jit_module, xi, g) for xi in inputs]
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    replays = []
    real_replay = F.Replay
    monkeypatch.setattr(F, "Replay", lambda *a: replays.append(1) or real_replay(*a))
    for i, (xi, want) in enumerate(zip(inputs, expected)):
        fast_module.zero_grad(set_to_none=True)
        jit_module.zero_grad(set_to_none=True)
        _assert_same(_step(fast_module, xi, g), want, f"call {i}")
    # calls 1 and 3 replay what calls 0 captured (forward and backward); call 2
    # (misaligned) captures its own
    assert len(replays) == 4


def test_fast_launch_inside_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    m = make_module("timm", 64, "cuda", train=False).to(torch.bfloat16)
    x = torch.randn(2, 64, 14, 14, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = m(x)  # captures the compiled kernels outside the graph
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            m(static_x)  # warm up on the side stream
            with torch.cuda.graph(graph, stream=stream):
                static_out = m(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(launch, "FAST_LAUNCH", False)
        assert torch.equal(static_out, m(x2))
        assert torch.equal(want, m(x))
