"""torch.autograd.gradcheck of the fused op in float64: x and every parameter."""
import pytest
import torch

from cbam_fused import cbam

from helpers import make_module


@pytest.mark.parametrize("variant", ["official", "timm", "timm_light", "ultralytics", "no_spatial"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(variant, layout, device):
    m = make_module(variant, 5, device, reduction=2, kernel_size=3).double()
    w = m.fused_weights()
    names = [n for n, t in w.tensors() if t.requires_grad]
    params = [getattr(w, n) for n in names]
    training = m.spec.has_spatial and w.has_bn

    def f(x, *ps):
        ww = w._replace(**dict(zip(names, ps)))
        return cbam(x, m.spec, ww, bn_training=training, bn_momentum=0.0)

    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


@pytest.mark.parametrize("variant", ["official", "timm"])
def test_gradcheck_full_jacobian(variant, device):
    """Every entry of the Jacobian (not a random projection), on a tiny input."""
    m = make_module(variant, 3, device, reduction=2, kernel_size=3).double()
    w = m.fused_weights()
    names = [n for n, t in w.tensors() if t.requires_grad]

    def f(x, *ps):
        return cbam(x, m.spec, w._replace(**dict(zip(names, ps))), bn_training=True,
                    bn_momentum=0.0)

    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *[getattr(w, n) for n in names]), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)
