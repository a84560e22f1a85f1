"""Helpers for the tests that compare whole models before and after convert(): the real
CBAM classes, non-trivial weights, one training step's outputs, and the comparison of a
converted copy against the float64 original."""
import copy

import pytest
import torch
from torch import nn

from cbam_fused import convert

from helpers import UNIT_ROUNDOFF, assert_close
from official_cbam import CBAM as OfficialCBAM


def ultralytics_cbam():
    """ultralytics' CBAM class; tests that need it skip where ultralytics is not installed
    (the GPU machine image has none), and the rest of their file still runs."""
    conv = pytest.importorskip("ultralytics.nn.modules.conv",
                               reason="ultralytics is not installed")
    return conv.CBAM


def source_cbam_classes():
    """Every CBAM class convert() replaces, that is installed here."""
    from timm.layers.cbam import CbamModule, LightCbamModule

    classes = [CbamModule, LightCbamModule, OfficialCBAM]
    try:
        from ultralytics.nn.modules.conv import CBAM as UltralyticsCBAM
        classes.append(UltralyticsCBAM)
    except ImportError:
        pass
    return tuple(classes)


def randomize(model):
    """Non-trivial weights: timm zero-initializes the last BatchNorm of each residual
    branch, which would feed the CBAM blocks all zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def run(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(g)
    return dict(out=out.detach(), dx=x.grad,
                grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b.detach().clone() for n, b in model.named_buffers()})


def compare_models(original, make_input, *, dtype, train, device, what, steps_len,
                   prepare=lambda m: m):
    """The converted copy of `original` in `dtype` vs the original in float64 (the
    reference). The conditioning measurement is the original in `dtype`, run on the
    input perturbed by one unit roundoff of `dtype`: how far plain PyTorch moves from
    the reference under the rounding any implementation in `dtype` makes (a deep
    network with BatchNorm over few values amplifies it)."""
    original = prepare(randomize(original).train(train))
    ref64 = copy.deepcopy(original).double().to(device)
    plain = copy.deepcopy(original).to(dtype=dtype, device=device)
    fused = convert(copy.deepcopy(original).to(dtype=dtype, device=device))
    assert not any(isinstance(m, source_cbam_classes()) for m in fused.modules())
    x = make_input().to(device)
    g = torch.randn(ref64(x.double()).shape, dtype=torch.float64, device=device)
    ref64 = copy.deepcopy(original).double().to(device)  # fresh BN state
    r = run(ref64, x.double(), g)
    p = run(plain, (x.double() * (1 + UNIT_ROUNDOFF[dtype])).to(dtype), g.to(dtype))
    f = run(fused, x.to(dtype), g.to(dtype))
    assert list(f["grads"]) == list(r["grads"]) and list(f["buffers"]) == list(r["buffers"])
    assert_close(f["out"], r["out"], dtype, steps_len, f"{what} out", p["out"])
    assert_close(f["dx"], r["dx"], dtype, steps_len, f"{what} dx", p["dx"])
    for n in r["grads"]:
        assert_close(f["grads"][n], r["grads"][n], dtype, steps_len, f"{what} grad {n}", p["grads"][n])
    for n in r["buffers"]:
        if "num_batches" in n:
            assert torch.equal(f["buffers"][n].cpu(), r["buffers"][n].cpu()), n
        else:
            assert_close(f["buffers"][n], r["buffers"][n], dtype, steps_len, f"{what} {n}", p["buffers"][n])
