"""Alignment: what Triton specializes a launch on (sizes divisible by 16, addresses
16-byte aligned), as the launchers arrange and report it.

- Every scratch-workspace region a kernel receives starts on a 16-byte boundary,
  whatever the shape (plan.aligned): a region at an odd offset would get another
  specialization and lose 16-byte access. The saved workspaces (outputs of the
  registered forward op, every element written) are not padded, so at odd N*C or N*H*W
  their regions are the only pointers off a 16-byte boundary. Shapes here make region
  sizes odd: N = 1 and 3, C and H*W odd.
- A launch Triton specializes as unaligned (H*W = 49, an input at an odd offset) gets
  the register budget its unaligned builds are checked with (plan.big_pass_options,
  aot._unaligned); an aligned one keeps the aligned budget.
"""
import pytest
import torch
from helpers import make_module

import cbam_fused.function as F
from cbam_fused.plan import (REGION_ALIGN, UNALIGNED_BUDGET_KERNELS, UNALIGNED_MAXNREG,
                             UNALIGNED_PARTIAL_ROWS_MAXNREG, block_plan)

# (variant, N, C, H, W, dtype)
CASES = [("official", 1, 13, 5, 7, torch.float32), ("timm", 3, 9, 3, 5, torch.bfloat16),
         ("timm", 2, 33, 7, 7, torch.float64), ("no_spatial", 1, 7, 3, 3, torch.float16)]


def _offsets(layout):
    start = 0
    for name, size in layout:
        yield name, start
        start += size


@pytest.mark.parametrize("variant,N,C,H,W,dtype", CASES)
def test_every_region_starts_16_byte_aligned(variant, N, C, H, W, dtype):
    """The layouts themselves: each region's offset in bytes is a multiple of 16."""
    m = make_module(variant, C, "cpu", reduction=2)
    spec, w = m.spec, m.fused_weights()
    x = torch.randn(N, C, H, W, dtype=dtype)
    plan = F.plan_for(x, spec, w, True)
    acc = plan.acc.itemsize
    # the forward's scratch is one allocation: the acc regions, then the int32 ones ("i32")
    layouts = [(plan.fwd_scratch_layout(), acc), (plan.fwd_scratch_i32_layout(), 4),
               (plan.bwd_scratch_layout(spec.kernel_size, spec.spatial_maps), acc)]
    odd = 0
    for layout, itemsize in layouts:
        for name, offset in _offsets(layout):
            if name.startswith("_pad"):
                continue
            assert offset * itemsize % 16 == 0, (name, offset, layout)
        odd += sum(size % REGION_ALIGN != 0 for name, size in layout if not name.startswith("_pad"))
    assert odd > 0, "no region of odd size: the case does not test the padding"
    block_plan.cache_clear()


@pytest.mark.parametrize("variant,N,C,H,W,dtype", CASES)
def test_kernels_receive_aligned_pointers(variant, N, C, H, W, dtype, monkeypatch):
    """A forward and backward under the interpreter: every tensor argument of every
    launch (regions, inputs, weights, outputs) has a 16-byte aligned address when the
    input, the gradient and the weights have, except regions of the saved workspaces."""
    seen = []

    def checking_launch(kernel, grid, args, constexprs):
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.numel():
                seen.append((kernel.fn.__name__, i, a.data_ptr()))
        return kernel[grid](*args, **constexprs)

    monkeypatch.setattr(F, "jit_launch", checking_launch)
    m = make_module(variant, C, "cpu", reduction=2).to(dtype if dtype == torch.float64
                                                        else torch.float32)
    x = torch.randn(N, C, H, W, dtype=dtype, requires_grad=True)
    assert x.data_ptr() % 16 == 0
    out = m(x)
    _, saved_acc, saved_i32, *_ = out.grad_fn.saved_tensors
    saved = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
             for t in (saved_acc, saved_i32)]
    out.backward(torch.randn(N, C, H, W, dtype=dtype))
    assert len({k for k, _, _ in seen}) >= 5, seen
    off = [(k, i) for k, i, p in seen
           if p % 16 and not any(lo <= p < hi for lo, hi in saved)]
    assert off == []


def _budgets(x, monkeypatch, variant="timm"):
    """{(kernel name, contiguous-axis flag): set of maxnreg options} of the kernels with an
    unaligned budget, over a forward and backward on x."""
    seen = {}

    def recording_launch(kernel, grid, args, constexprs):
        name = kernel.fn.__name__
        if name in UNALIGNED_BUDGET_KERNELS:
            flag = constexprs.get("K_CONTIG", constexprs.get("P_CONTIG"))
            seen.setdefault((name, flag), set()).add(constexprs.get("maxnreg"))
        return kernel[grid](*args, **constexprs)

    monkeypatch.setattr(F, "jit_launch", recording_launch)
    m = make_module(variant, x.shape[1], "cpu", reduction=2)
    x = x.detach().requires_grad_()
    m(x).backward(torch.ones_like(x))
    return seen


def _at_offset(shape, elements, channels_last=False, dtype=torch.bfloat16):
    """A dense tensor of `shape` (NCHW or channels_last) starting `elements` elements into
    its storage."""
    N, C, H, W = shape
    base = torch.randn(N * C * H * W + elements, dtype=dtype)[elements:]
    if channels_last:
        return base.view(N, H, W, C).permute(0, 3, 1, 2)
    return base.view(shape)


F1_NCHW, F2_NCHW = ("_pool_stats_kernel", True), ("_pool_stats_kernel", False)
F1_CL, F2_CL = F2_NCHW, F1_NCHW  # channels_last: F1 reduces the strided axis, F2 the contiguous
B2_NCHW, B2_CL = ("_bwd_spatial_pool_kernel", True), ("_bwd_spatial_pool_kernel", False)
UNALIGNED = {UNALIGNED_MAXNREG, UNALIGNED_PARTIAL_ROWS_MAXNREG}


@pytest.mark.parametrize("shape,offset,channels_last,dtype,expect_unaligned", [
    ((2, 32, 8, 8), 0, False, torch.bfloat16, set()),  # H*W = 64, C = 32, aligned input
    ((2, 32, 8, 8), 0, True, torch.float32, set()),
    ((2, 32, 7, 7), 0, False, torch.bfloat16, {F1_NCHW}),  # H*W = 49: F1 reduces along it
    ((2, 32, 7, 7), 0, True, torch.bfloat16, set()),  # rows of 49 positions, 2-byte I/O
    ((2, 32, 7, 7), 0, True, torch.float32, {F2_CL, B2_CL}),  # ... 4-byte I/O
    ((2, 32, 8, 8), 3, False, torch.bfloat16, {F1_NCHW}),  # the input 6 bytes off a boundary
    ((2, 32, 8, 8), 1, True, torch.float32, {F2_CL, B2_CL}),
])
def test_unaligned_launches_get_their_register_budget(shape, offset, channels_last, dtype,
                                                      expect_unaligned, monkeypatch):
    """The unaligned budget goes exactly to the unaligned launches of the configurations
    whose unaligned builds need it (plan.unaligned_budget): F1 in NCHW, F2 and B2 in
    channels_last at 4-byte I/O; every other launch keeps its aligned budget."""
    x = _at_offset(shape, offset, channels_last, dtype)
    assert (x.data_ptr() % 16 != 0) == (offset != 0)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    budgets = _budgets(x, monkeypatch)
    assert {F1_NCHW, F2_NCHW, B2_CL if channels_last else B2_NCHW} <= set(budgets), budgets
    got = {key for key, options in budgets.items() if options & UNALIGNED}
    assert got == expect_unaligned, budgets
    for key in expect_unaligned:
        assert len(budgets[key]) == 1, budgets
