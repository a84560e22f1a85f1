"""Forward, input gradient, every parameter gradient and BatchNorm running statistics
of the fused block against the float64 reference, per variant, dtype, layout and shape."""
import pytest
import torch

from helpers import VARIANTS, check_pair, make_module, run_pair

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]


def make_input(shape, dtype, layout, device):
    x = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_dtype_layout(variant, dtype, layout, device):
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device)
    if dtype == torch.float64:
        m = m.double()
    x = make_input(shape, dtype, layout, device)
    res = run_pair(m, x)
    out = res["fused"]["out"]
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last
                             if layout == "channels_last" else torch.contiguous_format)
    assert res["fused"]["dx"].dtype == dtype
    check_pair(res, dtype, shape, f"{variant}/{dtype}/{layout}")


SHAPES = [(n, c, h, w) for n in (1, 3) for c in (1, 3, 17, 64)
          for (h, w) in ((1, 1), (7, 7), (5, 9), (13, 17))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["official", "timm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape, variant, layout, device):
    N, C, H, W = shape
    # BatchNorm in training mode needs more than one value per channel.
    m = make_module(variant, C, device, train=N * H * W > 1)
    x = make_input(shape, torch.float32, layout, device)
    check_pair(run_pair(m, x), torch.float32, shape, f"{variant}/{shape}/{layout}")


@pytest.mark.parametrize("variant", ["official", "timm_light", "ultralytics"])
def test_eval_mode(variant, device):
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device, train=False)
    check_pair(run_pair(m, make_input(shape, torch.float32, "nchw", device)),
               torch.float32, shape, f"eval {variant}")


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_kernel_sizes(kernel_size, device):
    shape = (2, 20, 6, 7)
    m = make_module("timm", shape[1], device, kernel_size=kernel_size)
    check_pair(run_pair(m, make_input(shape, torch.float32, "nchw", device)),
               torch.float32, shape, f"k={kernel_size}")


@pytest.mark.parametrize("variant", ["official", "timm"])
def test_ties(variant, device):
    """Whole zero channels and repeated values (as after a ReLU): first-index vs split ties."""
    shape = (2, 16, 6, 6)
    x = torch.randn(shape, dtype=torch.float64).relu()
    x[:, ::3] = 0.0                       # channels that are all zero: ties over every position
    x[:, 1, :3] = x[:, 1, 3:]             # a repeated channel max
    x = torch.round(x * 4) / 4            # coarse values: many ties across channels
    m = make_module(variant, shape[1], device)
    check_pair(run_pair(m, x.float().to(device)), torch.float32, shape, f"ties {variant}")
