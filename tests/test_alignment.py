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
                             big_pass_options, block_plan)

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
    layouts = [(plan.fwd_scratch_acc_layout(), acc), (plan.fwd_scratch_i32_layout(), 4),
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
    """{kernel name: set of maxnreg options} over a forward and backward on x."""
    seen = {}

    def recording_launch(kernel, grid, args, constexprs):
        seen.setdefault(kernel.fn.__name__, set()).add(constexprs.get("maxnreg"))
        return kernel[grid](*args, **constexprs)

    monkeypatch.setattr(F, "jit_launch", recording_launch)
    m = make_module(variant, x.shape[1], "cpu", reduction=2)
    x = x.detach().requires_grad_()
    m(x).backward(torch.ones_like(x))
    return {k: v for k, v in seen.items() if k in UNALIGNED_BUDGET_KERNELS}


def _at_offset(shape, elements, dtype=torch.bfloat16):
    """A dense NCHW tensor of `shape` starting `elements` elements into its storage."""
    n = torch.Size(shape).numel()
    return torch.randn(n + elements, dtype=dtype)[elements:].view(shape)


@pytest.mark.parametrize("shape,offset,unaligned", [
    ((2, 32, 8, 8), 0, False),   # H*W = 64, C = 32, aligned input
    ((2, 32, 7, 7), 0, True),    # H*W = 49
    ((2, 32, 8, 8), 3, True),    # aligned sizes, the input 6 bytes past a boundary
])
def test_unaligned_launches_get_their_register_budget(shape, offset, unaligned, monkeypatch):
    x = _at_offset(shape, offset)
    assert (x.data_ptr() % 16 != 0) == (offset != 0)
    budgets = _budgets(x, monkeypatch)
    assert set(budgets) == set(UNALIGNED_BUDGET_KERNELS), budgets
    aligned_budget = {k: {big_pass_options(k_contig=True, io_bytes=2).get("maxnreg")}
                      for k in budgets}
    if unaligned:
        # F1 and F2 (the pool statistics kernel) both see an unaligned size or input
        assert budgets["_pool_stats_kernel"] == {UNALIGNED_MAXNREG}, budgets
        assert UNALIGNED_MAXNREG in budgets["_bwd_spatial_pool_kernel"], budgets
    else:
        assert UNALIGNED_MAXNREG not in set().union(*budgets.values()), budgets
        assert budgets["_bwd_spatial_pool_kernel"] == aligned_budget["_bwd_spatial_pool_kernel"]
