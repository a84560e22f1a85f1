"""Weights in any memory layout: a model moved to channels_last (timm's --channels-last
recipe) and parameters that are non-contiguous views give the float64 reference's
outputs, input gradient, parameter gradients and BatchNorm statistics."""
import pytest
import torch
from torch import nn

from helpers import VARIANTS, check_pair, make_module, run_pair
from model_helpers import compare_models, ultralytics_cbam
from official_cbam import CBAM as OfficialCBAM

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402


def _channels_last(model):
    model = model.to(memory_format=torch.channels_last)
    strided = [n for n, p in model.named_parameters() if not p.is_contiguous()]
    assert any("conv" in n or "cv1" in n for n in strided), \
        f"channels_last left every spatial conv weight contiguous: {strided}"
    return model


BLOCKS = {
    "timm": lambda: CbamModule(24),
    "ultralytics": lambda: ultralytics_cbam()(24, 7),
    "official": lambda: OfficialCBAM(24, 4),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_model_in_channels_last(kind, train, device):
    """model.to(memory_format=torch.channels_last): the k x k conv weight [1, 2, k, k] gets
    strides (2k^2, 1, 2k, 2)."""
    compare_models(nn.Sequential(BLOCKS[kind]()), lambda: torch.randn(2, 24, 7, 6),
                   dtype=torch.float32, train=train, device=device,
                   what=f"{kind} channels_last train={train}", steps_len=24 * 42,
                   prepare=_channels_last)


def _as_strided_parameter(p: torch.Tensor) -> nn.Parameter:
    """The same values, held as every other element of a buffer twice as long: a
    non-contiguous view (for tensors of more than one element)."""
    holder = torch.zeros(*p.shape, 2, dtype=p.dtype, device=p.device)
    holder[..., 0] = p.detach()
    return nn.Parameter(holder[..., 0], requires_grad=p.requires_grad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_a_strided_view(variant, device):
    m = make_module(variant, 12, device, reduction=3)
    for name, p in list(m.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        setattr(m.get_submodule(owner_name), attr, _as_strided_parameter(p))
    strided = [n for n, p in m.named_parameters() if not p.is_contiguous()]
    assert any("mlp.1.weight" in n for n in strided) and len(strided) >= 2, strided
    x = torch.randn(2, 12, 5, 6, device=device)
    res = run_pair(m, x)
    check_pair(res, torch.float32, x.shape, f"{variant} strided parameters")
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
