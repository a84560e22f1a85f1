"""Second-order gradients (create_graph=True): gradient penalties, Hessian-vector
products. The fused block's gradient must itself be differentiable and exact: gradcheck
and gradgradcheck in float64, and a gradient penalty through a converted model against
the unconverted model in float64."""
import copy

import pytest
import torch
from torch import nn

from cbam_fused import cbam, cbam_reference, convert

from helpers import assert_close, make_module
from model_helpers import randomize, ultralytics_cbam
from official_cbam import CBAM as OfficialCBAM

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402


def _functional(m, bn_training):
    """(f(x, *params), params): the fused op as a function of x and every trainable weight,
    BatchNorm in batch statistics (bn_training) or in the module's running statistics."""
    w = m.fused_weights()
    names = [n for n, t in w.tensors() if t.requires_grad]

    def f(x, *ps):
        return cbam(x, m.spec, w._replace(**dict(zip(names, ps))), bn_training=bn_training,
                    bn_momentum=0.0)
    return f, [getattr(w, n) for n in names]


@pytest.mark.parametrize("variant,bn_training", [
    ("official", True), ("official", False), ("timm", True), ("timm_light", True),
    ("ultralytics", False), ("no_spatial", False)])
def test_gradgradcheck(variant, bn_training, device):
    m = make_module(variant, 4, device, reduction=2, kernel_size=3).double()
    f, params = _functional(m, bn_training)
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    inputs = (x, *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5,
                                        fast_mode=True)


def _penalized_step(model, x):
    """loss = sum(out * t) + |d loss0 / dx|^2: the gradient penalty of WGAN-GP and R1.
    Returns x's gradient and every parameter's."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    target = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    loss0 = (out.flatten() * target).sum()
    (gx,) = torch.autograd.grad(loss0, x, create_graph=True)
    (loss0 + gx.pow(2).sum()).backward()
    return [x.grad] + [p.grad for p in model.parameters()]


BLOCKS = {
    "timm": lambda: CbamModule(8, rd_ratio=0.25),
    "ultralytics": lambda: ultralytics_cbam()(8, 3),
    "official": lambda: OfficialCBAM(8, 2),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_gradient_penalty_through_a_converted_model(kind, train, device):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), BLOCKS[kind](),
                        nn.Conv2d(8, 4, 3, padding=1))
    plain = randomize(net).double().to(device).train(train)
    fused = convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=device)
    want, got = _penalized_step(plain, x), _penalized_step(fused, x)
    names = ["x"] + [n for n, _ in plain.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, torch.float64, 8 * 30, f"{kind} train={train} second-order grad {name}")


class _Reference(nn.Module):
    """A CBAM module computed by the float64 reference (plain autograd)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        bn = self.m.SpatialGate.spatial.bn
        return cbam_reference(x, self.m.spec, self.m.fused_weights(), bn_training=bn.training,
                              bn_momentum=bn.momentum)


def test_gradient_penalty_on_a_lone_block(device):
    """The block as the whole model: the first-order gradient is a function of x only
    through the block's backward."""
    m = make_module("official", 6, device, reduction=2).double()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device)
    got = _penalized_step(m, x)
    want = _penalized_step(_Reference(ref), x)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, 6 * 20, "lone block second-order grad")


def test_first_order_backward_still_runs_the_kernels(device, monkeypatch):
    """The differentiable backward is for create_graph=True only: a plain backward runs the
    fused backward kernels and never the recomputation."""
    import cbam_fused.function as F

    def boom(*a, **k):
        raise AssertionError("the differentiable backward ran")
    monkeypatch.setattr(F, "differentiable_backward", boom)
    m = make_module("timm", 6, device)
    x = torch.randn(2, 6, 4, 5, device=device, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None
