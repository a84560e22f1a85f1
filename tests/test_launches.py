"""Launches per block (issue 11): every Triton launch plus every torch op that would launch
device work (memsets and casts included), counted in the interpreter, under the launch
plan a 132-SM H100/H200 gets (splits and all), not the one-split plan of the interpreter.

Bounds, training mode with the spatial BatchNorm in batch-statistics mode: forward <= 5,
backward <= 7 for the official, timm and timm-Light variants in bf16, fp16 and fp32, both
layouts; ultralytics' one C x C layer and SyncBatchNorm may add at most 2 each (the
SyncBatchNorm count is checked in tests/test_distributed.py). The same calls are compared
with the float64 reference, so the split plan's fixed-order merges are checked too.
"""
import pytest
import torch

import cbam_fused.plan as plan_module
from cbam_fused.accounting import TrafficCounter, count_torch_ops
from cbam_fused.function import plan_for, triton_interpreter_active
from cbam_fused.launchers import dense_layout

from helpers import check_pair, make_module, run_pair

pytestmark = pytest.mark.skipif(
    not triton_interpreter_active(),
    reason="counts Triton launches in the interpreter; on CUDA, test_cuda_kernels_per_block "
           "counts the kernels the device runs (torch.profiler)")

H100_SMS = 132
FORWARD = ["_pool_stats_kernel", "_channel_gate_fwd_kernel", "_pool_stats_kernel",
           "_spatial_gate_fwd_kernel", "_gate_apply_kernel"]
BACKWARD = ["_bwd_gate_sums_kernel", "_spatial_gate_bwd_stats_kernel", "_spatial_gate_bwd_kernel",
            "_bwd_spatial_pool_kernel", "_channel_gate_bwd_kernel", "_weight_grads_kernel"]
# ... then B3, by rows or by tiles (plan.b3_rows)
B3 = {True: "_bwd_input_rows_kernel", False: "_bwd_input_kernel"}
# Bounds of the issue; the extra allowance of a variant.
BOUND_FWD, BOUND_BWD = 5, 7
EXTRA = {"official": 0, "timm": 0, "timm_light": 0, "ultralytics": 2}


@pytest.fixture
def h100_plan(monkeypatch):
    monkeypatch.setattr(plan_module, "INTERPRETER_SM_COUNT", H100_SMS)


def _input(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def count_launches(module, x):
    """(forward launches, backward launches, forward kernel order, backward kernel order)."""
    x = x.detach().clone().requires_grad_()
    with TrafficCounter() as fwd, count_torch_ops(fwd) as fwd_ops:
        out = module(x)
    g = torch.randn_like(out)
    with TrafficCounter() as bwd, count_torch_ops(bwd) as bwd_ops:
        out.backward(g)
    return (len(fwd.order) + sum(fwd_ops.values()), len(bwd.order) + sum(bwd_ops.values()),
            (fwd.order, dict(fwd_ops)), (bwd.order, dict(bwd_ops)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(EXTRA))
def test_launches_per_block(variant, dtype, layout, h100_plan):
    shape = (2, 64, 14, 14)
    m = make_module(variant, shape[1], "cpu")
    x = _input(shape, dtype, layout)
    xd, p_contig = dense_layout(x)
    plan = plan_for(xd, m.spec, m.fused_weights(), p_contig)
    assert plan.f1.splits > 1 or plan.f2.splits > 1, "the H100 plan of this shape splits"
    n_fwd, n_bwd, fwd, bwd = count_launches(m, x)
    assert n_fwd <= BOUND_FWD + EXTRA[variant], fwd
    assert n_bwd <= BOUND_BWD + EXTRA[variant], bwd
    assert fwd == (FORWARD, {}) and bwd == (BACKWARD + [B3[plan.b3_block_k > 0]], {})


@pytest.mark.parametrize("variant", ["no_spatial", "conv_bias_no_bn"])
def test_launches_other_variants(variant, h100_plan):
    m = make_module(variant, 64, "cpu")
    n_fwd, n_bwd, fwd, bwd = count_launches(m, _input((2, 64, 14, 14), torch.bfloat16, "nchw"))
    assert n_fwd <= BOUND_FWD and n_bwd <= BOUND_BWD, (fwd, bwd)


def test_eval_and_no_grad_launch_no_more(h100_plan):
    m = make_module("timm", 64, "cpu", train=False)
    x = _input((2, 64, 14, 14), torch.bfloat16, "nchw")
    n_fwd, n_bwd, fwd, bwd = count_launches(m, x)
    assert n_fwd <= BOUND_FWD and n_bwd <= BOUND_BWD, (fwd, bwd)
    with TrafficCounter() as t, count_torch_ops(t) as ops, torch.no_grad():
        m.train()(x)
    assert len(t.order) + sum(ops.values()) <= BOUND_FWD, (t.order, ops)


@pytest.mark.parametrize("variant,shape,dtype,layout", [
    ("official", (2, 40, 12, 12), torch.float32, "nchw"),
    ("timm", (1, 300, 9, 7), torch.float32, "channels_last"),
    ("timm_light", (2, 40, 12, 12), torch.bfloat16, "channels_last"),
    ("ultralytics", (3, 17, 13, 9), torch.float64, "nchw"),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_split_plan_matches_reference(variant, shape, dtype, layout, h100_plan):
    """The H100 plan splits F1, F2 and B1 over many programs; the merges that follow
    (inside the small-map kernels) must give the reference's numbers."""
    m = make_module(variant, shape[1], "cpu")
    if dtype == torch.float64:
        m = m.double()
    x = _input(shape, dtype, layout)
    xd, p_contig = dense_layout(x)
    plan = plan_for(xd, m.spec, m.fused_weights(), p_contig)
    assert max(plan.f1.splits, plan.f2.splits, plan.b1_splits) > 1
    check_pair(run_pair(m, x), dtype, shape, f"H100 plan {variant}")
