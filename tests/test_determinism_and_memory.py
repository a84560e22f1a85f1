"""Bitwise-deterministic backward; what is saved for backward; no-grad saves nothing."""
import pytest
import torch

from cbam_fused.accounting import saved_for_backward, tensor_bytes

from helpers import make_module


def _grads(m, x, g):
    m.zero_grad()
    xx = x.detach().clone().requires_grad_()
    m(xx).backward(g)
    return [xx.grad.clone()] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("variant", ["official", "timm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_bitwise_deterministic(variant, dtype, device):
    m = make_module(variant, 24, device).eval()  # eval: both runs see the same BN state
    x = torch.randn(3, 24, 9, 10, device=device, dtype=dtype)
    g = torch.randn_like(x)
    a, b = _grads(m, x, g), _grads(m, x, g)
    for t1, t2 in zip(a, b):
        assert torch.equal(t1, t2)


def _saved(m, x, params):
    """Bytes of every tensor saved for backward, excluding the module's own parameters
    and buffers (saving those allocates nothing), and the full-size ones."""
    with saved_for_backward(params) as saved:
        out = m(x)
    return out, tensor_bytes(saved), [t for t in saved if t.numel() >= x.numel()]


@pytest.mark.parametrize("variant", ["official", "timm", "no_spatial"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_saved_for_backward_is_x_plus_small(variant, layout, device):
    N, C, H, W = 2, 32, 12, 12
    m = make_module(variant, C, device)
    x = torch.randn(N, C, H, W, device=device, dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    params = list(m.parameters()) + list(m.buffers())
    _, nbytes, full = _saved(m, x, params)
    assert len(full) == 1 and full[0].data_ptr() == x.data_ptr(), "only x itself may be full-size"
    # x, plus at most 6 fp32/int32 rows of N*C and N*H*W each (pools, argmax, counts, gates)
    small = 6 * 4 * (N * C + N * H * W)
    assert nbytes <= x.numel() * x.element_size() + small, nbytes


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_no_grad_forward_saves_nothing(ctx, device):
    m = make_module("official", 16, device)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    manager = torch.no_grad() if ctx == "no_grad" else torch.inference_mode()
    with saved_for_backward() as saved, manager:
        out = m(x)
    assert saved == []
    assert out.grad_fn is None


def test_eager_saves_more(device):
    """The fused block saves less than the eager reference (which keeps y = x * ca)."""
    from cbam_fused import cbam_reference
    m = make_module("official", 32, device)
    x = torch.randn(2, 32, 12, 12, device=device, requires_grad=True)
    params = list(m.parameters()) + list(m.buffers())
    _, fused_bytes, _ = _saved(m, x, params)
    with saved_for_backward(params) as saved:
        cbam_reference(x, m.spec, m.fused_weights(), bn_training=True, bn_momentum=0.01)
    assert tensor_bytes(saved) >= fused_bytes + tensor_bytes([x])
