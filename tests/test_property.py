"""Property-based test: random shapes, layouts and strides, dtypes, variants, magnitudes
and ties; fused forward and backward against the float64 reference.

The example count is bounded for the suite's time budget and the search is derandomized
(CI sees the same examples every run). Run it longer, with fresh examples:

    make test-long        (500 fresh examples; CBAM_HYPOTHESIS_EXAMPLES=N for more)
"""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import VARIANTS, check_pair, make_module, run_pair

EXAMPLES = int(os.environ.get("CBAM_HYPOTHESIS_EXAMPLES", "40"))
DERANDOMIZE = os.environ.get("CBAM_HYPOTHESIS_RANDOM", "0") in ("", "0")

# Magnitude exponents per dtype: wide, but inside each format's normal range after the
# reductions (fp16 overflows at 65504).
EXPONENTS = {torch.float16: (-3, 3), torch.bfloat16: (-8, 8), torch.float32: (-8, 8),
             torch.float64: (-12, 12)}
LAYOUTS = ("nchw", "channels_last", "channel_slice", "spatial_crop", "transposed")


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(list(EXPONENTS)))
    lo, hi = EXPONENTS[dtype]
    return dict(
        variant=draw(st.sampled_from(list(VARIANTS))),
        dtype=dtype,
        shape=(draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 11)),
               draw(st.integers(1, 11))),
        layout=draw(st.sampled_from(LAYOUTS)),
        exponent=draw(st.integers(lo, hi)),
        ties=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def make_input(case, device):
    N, C, H, W = case["shape"]
    g = torch.Generator().manual_seed(case["seed"])
    layout = case["layout"]
    base_shape = {"channel_slice": (N, 2 * C, H, W), "spatial_crop": (N, C, H + 1, W + 2),
                  "transposed": (N, C, W, H)}.get(layout, (N, C, H, W))
    x = torch.randn(base_shape, generator=g, dtype=torch.float64)
    if case["ties"]:  # as after a ReLU, on a coarse grid: ties in every max
        x = torch.round(x.relu() * 2) / 2
    x = (x * 10.0 ** case["exponent"]).to(case["dtype"]).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = x[:, ::2]
    elif layout == "spatial_crop":
        x = x[:, :, 1:, 2:]
    elif layout == "transposed":
        x = x.transpose(2, 3)
    assert tuple(x.shape) == case["shape"]
    return x


@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_fused_matches_reference(case, device):
    N, C, H, W = case["shape"]
    torch.manual_seed(case["seed"])
    m = make_module(case["variant"], C, device, train=N * H * W > 1)
    if case["dtype"] == torch.float64:
        m = m.double()
    x = make_input(case, device)
    res = run_pair(m, x)
    assert res["fused"]["out"].dtype == case["dtype"]
    check_pair(res, case["dtype"], case["shape"], f"{case}")
