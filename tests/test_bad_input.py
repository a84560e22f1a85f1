"""Bad input: a clear error naming the problem, before any kernel launch, with module
state (BatchNorm running statistics, batch counter) untouched."""
import pytest
import torch

import cbam_fused.launchers as L
from cbam_fused import CBAM, CBAMSpec

from helpers import make_module


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any launcher runs."""
    def boom(*a, **k):
        raise AssertionError("a kernel was launched")
    for name in L.LAUNCHERS:
        monkeypatch.setattr(L, name, boom)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


CASES = [
    ("3-D input", lambda d: torch.randn(16, 5, 5, device=d), ValueError, "4-D input"),
    ("5-D input", lambda d: torch.randn(1, 16, 2, 5, 5, device=d), ValueError, "4-D input"),
    ("wrong channels", lambda d: torch.randn(2, 8, 5, 5, device=d), ValueError, "16 channels"),
    ("int dtype", lambda d: torch.ones(2, 16, 5, 5, dtype=torch.int32, device=d), TypeError, "int32"),
    ("complex dtype", lambda d: torch.ones(2, 16, 5, 5, dtype=torch.complex64, device=d), TypeError,
     "complex64"),
    ("not a tensor", lambda d: [[1.0]], TypeError, "list"),
    ("BN batch of one value", lambda d: torch.randn(1, 16, 1, 1, device=d), ValueError,
     "more than one value"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_launch(case, device, no_launch):
    _, make_x, exc, words = case
    m = make_module("official", 16, device)
    before = _state(m)
    with pytest.raises(exc, match=words):
        m(make_x(device))
    after = _state(m)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


def _bn_state(m):
    return {k: v.clone() for k, v in m.SpatialGate.spatial.bn.state_dict().items()}


def _assert_same(before, after):
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


def test_parameter_on_other_device(device, no_launch):
    m = make_module("official", 16, device)
    m.ChannelGate.mlp[3].to("meta")
    before = _bn_state(m)
    with pytest.raises(ValueError, match="fc2_weight is on meta"):
        m(torch.randn(2, 16, 5, 5, device=device))
    _assert_same(before, _bn_state(m))


def test_parameter_wrong_shape(device, no_launch):
    m = make_module("official", 16, device)
    with torch.no_grad():
        m.SpatialGate.spatial.conv.weight = torch.nn.Parameter(torch.randn(1, 3, 7, 7, device=device))
    before = _bn_state(m)
    with pytest.raises(ValueError, match=r"conv_weight has shape \(1, 3, 7, 7\)"):
        m(torch.randn(2, 16, 5, 5, device=device))
    _assert_same(before, _bn_state(m))


def test_bad_spec():
    with pytest.raises(ValueError, match="max_mode"):
        CBAMSpec(max_mode="last")
    with pytest.raises(ValueError, match="kernel_size"):
        CBAM(16, kernel_size=4)
    with pytest.raises(ValueError, match="spatial_pool"):
        CBAM(16, spatial_pool="max")


def test_empty_batch_launches_nothing(device, no_launch):
    m = make_module("official", 16, device).eval()
    x = torch.randn(0, 16, 5, 5, device=device, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
