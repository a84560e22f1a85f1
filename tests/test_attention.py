"""record_attention and the plot helper (issue 14): the recorded gates equal the float64
reference's, recording changes nothing else, and nothing is recorded outside the block."""
import copy

import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import record_attention
from cbam_fused.plot import attention_figure

from helpers import VARIANTS, assert_close, bn_args, make_module


def _reference_gates(module, x):
    ref = copy.deepcopy(module).double().cpu()
    bn_training, momentum = bn_args(module)
    seen = {}

    def gates(ca, sa, shape):
        seen["channel"] = ca.reshape(shape[0], shape[1])
        seen["spatial"] = None if sa is None else sa.reshape(shape[0], 1, *shape[2:])
    cbam_fused.cbam_reference(x.detach().double().cpu(), ref.spec, ref.fused_weights(),
                              bn_training=bn_training, bn_momentum=momentum, gates=gates)
    return seen


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recorded_gates_match_the_reference(variant, train, device):
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device, train=train)
    x = torch.randn(shape, device=device)
    want = _reference_gates(m, x)
    model = nn.Sequential(m)
    with record_attention(model) as maps:
        model(x)
    assert list(maps) == ["0"]
    got = maps["0"]
    assert got.channel.dtype == torch.float32 and got.channel.device == x.device
    assert got.channel.shape == (3, 17) and not got.channel.requires_grad
    assert_close(got.channel, want["channel"], torch.float32, 4 * 45, f"{variant} channel gate")
    if want["spatial"] is None:
        assert got.spatial is None
    else:
        assert got.spatial.shape == (3, 1, 5, 9)
        assert_close(got.spatial, want["spatial"], torch.float32, 4 * 45, f"{variant} spatial gate")
    assert bool(((got.channel > 0) & (got.channel < 1)).all())


def _fwd_bwd(model, x, g):
    model.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_()
    out = model(xx)
    out.backward(g)
    return [out.detach(), xx.grad] + [p.grad for p in model.parameters()]


def test_recording_changes_no_output_or_gradient(device):
    m = make_module("timm", 16, device).eval()  # eval: both runs see the same BN state
    model = nn.Sequential(m, nn.Conv2d(16, 16, 1), make_module("official", 16, device).eval())
    model = model.to(device)
    x = torch.randn(2, 16, 6, 7, device=device)
    g = torch.randn_like(x)
    plain = _fwd_bwd(model, x, g)
    with record_attention(model) as maps:
        recorded = _fwd_bwd(model, x, g)
    assert list(maps) == ["0", "2"]  # forward order
    for a, b in zip(plain, recorded):
        assert torch.equal(a, b)


def test_nothing_recorded_after_the_block(device):
    m = make_module("official", 8, device)
    x = torch.randn(2, 8, 4, 5, device=device)
    with record_attention(m) as maps:
        with torch.no_grad():
            m(x)
    assert list(maps) == [""]
    before = maps[""].channel.clone()
    m(x * 2)
    assert list(maps) == [""] and torch.equal(maps[""].channel, before)
    assert cbam_fused.attention.recorder_of(m) is None


def test_needs_a_fused_block():
    with pytest.raises(ValueError, match="no fused CBAM block"):
        with record_attention(nn.Sequential(nn.ReLU())):
            pass


def test_refuses_inside_torch_compile(device):
    torch._dynamo.reset()
    m = make_module("official", 8, device).eval()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with record_attention(m):
        with pytest.raises(Exception, match="record_attention does not work inside torch.compile"):
            compiled(torch.randn(2, 8, 4, 5, device=device))


def test_converted_timm_model_and_figure(device, tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=4)
    model = cbam_fused.convert(model).to(device).eval()
    image = torch.rand(3, 32, 32)
    with record_attention(model) as maps, torch.no_grad():
        model(image[None].to(device))
    assert len(maps) == 8 and all(k.startswith("layer") for k in maps)
    assert list(maps) == [n for n, m in model.named_modules()
                          if isinstance(m, cbam_fused.FusedCBAMBase)]
    path = attention_figure(image, maps, str(tmp_path / "attention.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_ultralytics_model(device):
    conv = pytest.importorskip("ultralytics.nn.modules.conv", reason="ultralytics is not installed")
    model = cbam_fused.convert(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), conv.CBAM(16, 7)))
    model = model.to(device)
    with record_attention(model) as maps:
        model(torch.randn(2, 3, 8, 8, device=device))
    assert list(maps) == ["1"] and maps["1"].spatial.shape == (2, 1, 8, 8)
