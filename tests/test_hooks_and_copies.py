"""Module hooks survive convert(): hooks on a CBAM block keep firing on the fused block
(and their handles still remove them); a block whose gate children carry hooks is left
alone, with the reason in the report and a warning. record_attention does not follow a
copy of a block."""
import copy

import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import convert, record_attention, unconvert
from cbam_fused.convert import FusedTimmCbam

from helpers import assert_close
from model_helpers import randomize
from official_cbam import CBAM as OfficialCBAM

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402


def _hooked(block, log):
    """Hooks of every kind on `block`; the pre-hook and the forward hook change the values,
    so an output that ignored them would differ."""
    return [
        block.register_forward_pre_hook(lambda m, args: (log.append("pre"), (2 * args[0],))[1]),
        block.register_forward_hook(lambda m, args, out: (log.append("fwd"), out + 1)[1]),
        block.register_forward_hook(lambda m, args, kwargs, out: log.append("fwd-kwargs"),
                                    with_kwargs=True),
        block.register_full_backward_pre_hook(lambda m, gout: log.append("bwd-pre")),
        block.register_full_backward_hook(
            lambda m, gin, gout: (log.append("bwd"), (3 * gin[0],))[1]),
    ]


def _step(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize("kind", ["timm", "official"])
def test_block_hooks_keep_firing_after_convert(kind, device):
    make = {"timm": lambda: CbamModule(8, rd_ratio=0.25), "official": lambda: OfficialCBAM(8, 2)}
    plain = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make[kind]())).double()
    plain = plain.to(device).eval()
    fused = copy.deepcopy(plain)
    plain_log, fused_log = [], []
    _hooked(plain[1], plain_log)
    handles = _hooked(fused[1], fused_log)
    fused = convert(fused)
    assert isinstance(fused[1], cbam_fused.FusedCBAMBase)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device)
    want, got = _step(plain, x), _step(fused, x)
    assert fused_log == plain_log == ["pre", "fwd", "fwd-kwargs", "bwd-pre", "bwd"]
    for a, b, what in zip(got, want, ("out", "dx")):
        assert_close(a, b, torch.float64, 8 * 30, f"hooked {kind} {what}")
    for h in handles:  # removing through the handles taken before convert
        h.remove()
    fused_log.clear()
    _step(fused, x)
    assert fused_log == []
    back = unconvert(fused)   # the original block, its hook registry shared with the fused one
    assert type(back[1]) is type(plain[1])
    _step(back, x)
    assert fused_log == []


CHILD_HOOKS = {
    "forward hook on channel.fc1": lambda b: b.channel.fc1.register_forward_hook(
        lambda m, i, o: None),
    "pre-hook on spatial.conv.bn": lambda b: b.spatial.conv.bn.register_forward_pre_hook(
        lambda m, i: None),
    "backward hook on channel": lambda b: b.channel.register_full_backward_hook(
        lambda m, gi, go: None),
    "old-style weight_norm on spatial.conv.conv": lambda b: nn.utils.weight_norm(
        b.spatial.conv.conv),
}


@pytest.mark.parametrize("case", list(CHILD_HOOKS))
def test_block_with_hooked_children_is_left_alone(case, device):
    """The fused block reads its children's weights and never calls them, so their hooks
    could not fire (old-style weight_norm recomputes the weight in a pre-hook: fusing would
    use a stale weight). Such a block stays as it is and the report says why."""
    block = randomize(CbamModule(8, rd_ratio=0.25)).to(device).eval()
    CHILD_HOOKS[case](block)
    x = torch.randn(2, 8, 5, 6, device=device)
    want = block(x)
    model = nn.Sequential(block)
    with pytest.warns(UserWarning, match="left 0 .CbamModule. unfused"):
        model, report = convert(model, return_report=True)
    assert model[0] is block and report.replaced == []
    (name, cls, why), = report.skipped
    assert (name, cls) == ("0", "CbamModule") and "would not fire" in why
    assert case.split(" on ")[1] in why
    assert torch.equal(model(x), want)


def test_record_attention_does_not_follow_copies(device):
    model = convert(nn.Sequential(CbamModule(8, rd_ratio=0.25))).to(device).eval()
    x = torch.randn(2, 8, 4, 5, device=device)
    with record_attention(model) as maps:
        ema = copy.deepcopy(model)   # e.g. an EMA copy or a checkpoint made while recording
        ema(x)
        assert list(maps) == []
        with record_attention(ema) as ema_maps:   # the copy records on its own
            ema(x)
        model(x)
    assert list(ema_maps) == ["0"] and list(maps) == ["0"]
    assert isinstance(ema[0], FusedTimmCbam)
