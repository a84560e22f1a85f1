"""Helpers shared by every CBAM kernel: plane addressing and NaN-aware max statistics.

Every kernel sees one sample of the activation as a dense 2-D plane of R rows
and K columns. Which of the two is contiguous in memory is a compile-time flag,
so one kernel body serves NCHW and channels_last without a copy:

    K_CONTIG = True :  element (r, k) lives at r * K + k
    K_CONTIG = False:  element (r, k) lives at k * R + r

For the channel view of NCHW (R = C, K = H*W) K is contiguous; for the same view
of channels_last, R is. Offsets are int64 because one tensor may hold more than
2**31 elements (64 x 256 x 384 x 384).

Integer arguments: the compiler turns an integer argument equal to 1 (C = 1, H*W = 1,
one block, one split) into a compile-time constant, a plain Python int inside the
kernel, while the interpreter passes every integer as a tensor. Kernel code must work
both ways: `tl.cast(C, dtype)`, never `C.to(dtype)`; arithmetic and comparisons with
tensors are fine. The CPU suite runs the interpreter with that specialization
(tests/cuda_preconditions.py) and the ahead-of-time builds include it (aot.py).
"""
import triton
import triton.language as tl

# Sentinel index for "no element seen yet"; larger than any valid row length.
NO_INDEX = 2147483647


@triton.jit
def _plane_offsets(offs_r, offs_k, R, K, K_CONTIG: tl.constexpr):
    """int64 offsets [BLOCK_R, BLOCK_K] of elements (offs_r, offs_k) in one plane."""
    if K_CONTIG:
        return offs_r[:, None].to(tl.int64) * K + offs_k[None, :]
    else:
        return offs_k[None, :].to(tl.int64) * R + offs_r[:, None]


@triton.jit
def _finalize_max_stats(acc_sum, acc_max, acc_idx, acc_cnt, AXIS: tl.constexpr):
    """Reduce per-lane running statistics along AXIS.

    acc_max holds each lane's running max, acc_idx the first index where it was
    reached, acc_cnt how many times. The result is the max over lanes (NaN if any
    lane holds NaN), the smallest index that reaches it (first-index semantics,
    the first NaN when NaN wins) and the total tie count over lanes.

    tl.max reduces with maxnum and drops NaN, unlike torch.max; a NaN flag restores it.
    (A tl.reduce with a NaN-propagating combine function does the same, but runs element
    by element in the interpreter.)
    """
    total = tl.sum(acc_sum, AXIS)
    has_nan = tl.max((acc_max != acc_max).to(tl.int32), AXIS) > 0
    m = tl.where(has_nan, float("nan"), tl.max(acc_max, AXIS))
    mb = tl.expand_dims(m, AXIS)
    is_max = (acc_max == mb) | ((acc_max != acc_max) & (mb != mb))
    idx = tl.min(tl.where(is_max, acc_idx, 2147483647), AXIS)
    cnt = tl.sum(tl.where(is_max, acc_cnt, 0), AXIS)
    return total, m, idx, cnt
