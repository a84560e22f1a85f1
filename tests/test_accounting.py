"""Accounting bounds, counted in the Triton interpreter: bytes of the big tensors each
direction moves, Triton launches, and bytes saved for backward (docs/design.md sections 4-5).

Forward: F1 reads x, F2 reads x, F3 reads x and writes out: 4|x|.
Backward: B1 reads g and x, B2 reads x, B3 reads g and x and writes dx: 5|x|.
Small operands (gates, pooled statistics, partial rows) are counted apart; they are
O(N*C + N*H*W).
"""
import pytest
import torch

from cbam_fused.accounting import TrafficCounter, saved_for_backward, tensor_bytes
from cbam_fused.function import triton_interpreter_active

from helpers import make_module

pytestmark = pytest.mark.skipif(
    not triton_interpreter_active(),
    reason="counts the loads and stores of the Triton interpreter; this run compiles the "
           "kernels (CBAM_TEST_DEVICE=cuda), where `make gpu-check` counts CUDA kernels with "
           "torch.profiler instead")

# Every variant, dtype and layout on one shape; odd and lopsided shapes on the default variant.
CASES = ([(v, (2, 40, 12, 12), d) for v in ("official", "timm", "ultralytics", "no_spatial")
          for d in (torch.bfloat16, torch.float32)]
         + [("official", s, torch.float16) for s in ((3, 17, 13, 9), (1, 130, 5, 7))])


def _measure(variant, shape, dtype, layout):
    m = make_module(variant, shape[1], "cpu")
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn_like(x)
    with TrafficCounter() as fwd, saved_for_backward(list(m.parameters()) + list(m.buffers())) as saved:
        out = m(x)
    with TrafficCounter() as bwd:
        out.backward(g)
    return tensor_bytes([x]), fwd, bwd, tensor_bytes(saved)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant,shape,dtype", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_traffic_launches_and_saved_bytes(variant, shape, dtype, layout):
    xb, fwd, bwd, saved = _measure(variant, shape, dtype, layout)
    f, b = fwd.totals(), bwd.totals()
    N, C, H, W = shape
    spatial = variant != "no_spatial"
    # launches: F1, phi, (F2, psi), F3 and B1, (psi stats, psi, B2), phi, weights, B3;
    # split merges run inside phi and psi (tests/test_launches.py counts the H100 plan)
    assert f.launches == (5 if spatial else 3), fwd.order
    assert b.launches == (7 if spatial else 4), bwd.order
    # big-tensor traffic, as multiples of |x|
    assert (f.big_read + f.big_written) / xb <= (4.1 if spatial else 3.1), vars(f)
    assert (b.big_read + b.big_written) / xb <= 5.1, vars(b)
    assert f.big_written / xb <= 1.0001 and b.big_written / xb <= 1.0001
    # the masks keep every pass inside the tensor: at least one full read of x each
    assert f.big_read / xb >= (3 if spatial else 2) - 1e-9
    # small operands stay O(N*C + N*H*W): a generous 64 fp32 rows of each, plus the k x k
    # conv and its transpose and weight gradient, which read each pooled-map value at every
    # tap (from L1), and the MLP weights, read once per sample
    k = 7  # make_module's default kernel size
    hidden = max(1, C // 4)
    small_limit = (64 + 4 * k * k) * 4 * (N * C + N * H * W) + 4 * N * 4 * C * max(hidden, C)
    assert f.small_read + f.small_written <= small_limit
    assert b.small_read + b.small_written <= small_limit
    # saved for backward: x itself plus small statistics
    assert saved <= 1.05 * xb + 8 * 4 * (N * C + N * H * W), saved / xb


def test_programs_per_launch_on_a_large_gpu(monkeypatch):
    """Per-launch records (what `make run` reports): under the plan of a 132-SM GPU the
    spatial maps run one program per (sample, row block) and B2 splits its positions;
    every program of a launch is recorded, with the bytes it moved."""
    from cbam_fused import plan as plan_module

    monkeypatch.setattr(plan_module, "INTERPRETER_SM_COUNT", 132)
    N, C, H, W = 2, 24, 14, 12
    _, fwd, bwd, _ = _measure("official", (N, C, H, W), torch.float32, "channels_last")
    programs = {(i, r.kernel): r.programs for i, r in enumerate(fwd.launches + bwd.launches)}
    rows = plan_module.psi_rows(N, H, W, 132)
    assert rows == 1
    psi = [p for (_, k), p in programs.items() if k.startswith("_spatial_gate")]
    assert psi == [N * H] * 3, programs
    b2_splits, _ = plan_module.position_split(N, C, H * W, False, torch.float32, 132)
    block_c = plan_module.b2_blocks(N, C, H * W, False, torch.float32, 132)[0]
    b2 = [p for (_, k), p in programs.items() if k == "_bwd_spatial_pool_kernel"]
    assert b2_splits > 1 and b2 == [N * -(-C // block_c) * b2_splits]
    for rec in fwd.launches + bwd.launches:
        assert len(rec.loads) == rec.programs and min(rec.bytes) > 0, rec.kernel


@pytest.mark.parametrize("hidden,C,tile", [(16, 256, 16), (32, 512, 16), (64, 1024, 16),
                                           (128, 2048, 32)])
def test_weight_gradient_tiles_of_a_large_gpu(hidden, C, tile):
    """ResNet-50's CBAM blocks on a 132-SM GPU: 16 x 16 weight-gradient tiles while 32 x 32
    ones would leave SMs idle (fewer than two programs per SM), 32 x 32 at C = 2048."""
    from cbam_fused import plan as plan_module

    p = plan_module.block_plan(64, C, 7, 7, hidden, True, True, 7, True, torch.bfloat16, 132)
    assert p.wg_tile == tile
    programs = p.wg_tiles1 + p.wg_tiles2
    assert programs == 2 * (hidden // tile) * (C // tile)
    if tile == 16:
        assert 2 * (hidden // 32) * (C // 32) < 2 * 132
    else:
        assert programs >= 2 * 132
    assert plan_module.weight_grad_samples(torch.bfloat16, tile) * tile * tile == 8192


def test_loops_are_pipelined_only_when_long_enough():
    """The split passes pipeline their loop (cp.async, kernels/plane.py STAGES deep) only
    when it has at least STAGES steps. On a 132-SM GPU, ResNet-50's first CBAM site
    pipelines F1 (H*W = 3136 positions per channel row) and F2 (256 channels: eight
    steps of a 32 x 32 tile in channels_last); its last site's F1 in NCHW (49 positions:
    two steps of a 32 x 32 tile) does not."""
    from cbam_fused import plan as plan_module

    stages = plan_module.STAGES.value
    assert stages > 1
    assert plan_module.loop_stages(stages * 128, 128) == stages
    assert plan_module.loop_stages((stages - 1) * 128, 128) == 1
    for p_contig in (True, False):
        p = plan_module.block_plan(64, 256, 56, 56, 16, True, True, 7, p_contig,
                                   torch.bfloat16, 132)
        assert p.f1.stages == stages
        assert p.f2.stages == stages
        assert p_contig or (p.f2.block_k, p.f2.block_r) == (32, 32)
    last = plan_module.block_plan(64, 2048, 7, 7, 16, True, True, 7, True, torch.bfloat16, 132)
    assert (last.f1.block_k, last.f1.block_r, last.f1.stages) == (32, 32, 1)
