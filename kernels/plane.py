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

# Software-pipelining depth of the loops that walk weights or partial rows: with
# tl.range(..., num_stages=STAGES) the compiler issues the loads of the next STAGES - 1
# iterations (cp.async into shared memory) while the current one computes, so a loop of T
# steps waits on about T / STAGES memory round trips instead of T.
STAGES = tl.constexpr(3)
# Partial rows one step of a small map's merge loop loads at once (_sum_partial_rows)
MERGE_ROWS_PER_STEP = tl.constexpr(32)

# Sentinel index for "no element seen yet"; larger than any valid row length.
NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def _plane_offsets(offs_r, offs_k, R, K, K_CONTIG: tl.constexpr, ROW_ALIGN: tl.constexpr = 1):
    """int64 offsets [BLOCK_R, BLOCK_K] of elements (offs_r, offs_k) in one plane.
    ROW_ALIGN: a number of elements the contiguous extent (K or R) is known to be a
    multiple of, where Triton does not know it (it knows multiples of 16): each row then
    starts on that boundary, and loads along it can be vectors of that many elements."""
    if K_CONTIG:
        rows = offs_r.to(tl.int64) * K
        if ROW_ALIGN > 1:
            rows = tl.multiple_of(rows, ROW_ALIGN)
        return rows[:, None] + offs_k[None, :]
    else:
        rows = offs_k.to(tl.int64) * R
        if ROW_ALIGN > 1:
            rows = tl.multiple_of(rows, ROW_ALIGN)
        return rows[None, :] + offs_r[:, None]


@triton.jit
def _below(offs, end, ALIGN: tl.constexpr):
    """offs < end for offsets along a contiguous axis whose end is a multiple of ALIGN
    (ROW_ALIGN): compared ALIGN elements at a time, so that Triton sees the mask constant
    over each aligned group and keeps vector loads (offs < end alone would be a mask per
    element: it does not carry a hint on end)."""
    if ALIGN > 1:
        return (offs // ALIGN) < (end // ALIGN)
    return offs < end


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


@triton.jit
def _combined_stats(psum_ptr, pmax_ptr, pidx_ptr, pcnt_ptr, base, R, S, offs_r, mask_r,
                    BLOCK_S: tl.constexpr):
    """Merge the S partial statistics [S, R] (from `base`) of rows offs_r, in a fixed
    order, into (sum, max, first index, tie count): the combine step of a split reduction.

        sum = sum_s psum,  max = max_s pmax,  idx = min{pidx_s : pmax_s == max},
        cnt = sum{pcnt_s : pmax_s == max}            (BLOCK_S >= S)
    """
    offs_s = tl.arange(0, BLOCK_S)
    mask = mask_r[:, None] & (offs_s[None, :] < S)
    offs = base + offs_s[None, :].to(tl.int64) * R + offs_r[:, None]
    psum = tl.load(psum_ptr + offs, mask=mask, other=0.0)
    pmax = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
    pidx = tl.load(pidx_ptr + offs, mask=mask, other=2147483647)
    pcnt = tl.load(pcnt_ptr + offs, mask=mask, other=0)
    return _finalize_max_stats(psum, pmax, pidx, pcnt, 1)


@triton.jit
def _scalar(hi, lo, ACC_DTYPE: tl.constexpr):
    """A float argument passed as two fp32 halves (hi = fp32(v), lo = fp32(v - hi)):
    Triton passes Python floats as fp32, which is too coarse for fp64 statistics."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _combine_moments(mom_ptr, num_parts, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """(count, mean, biased variance) of the union of num_parts groups whose
    (count, mean, M2) rows lie at mom_ptr ([num_parts, 3]); Chan's parallel combination,
    in a fixed order (deterministic):
        count = sum n_i,  mean = sum n_i mean_i / count,
        M2 = sum M2_i + sum n_i (mean_i - mean)^2,  var = M2 / count
    Up to BLOCK rows are read once (one round trip); more are read in a second pass.
    """
    offs = tl.arange(0, BLOCK)
    m = offs < num_parts
    cnt0 = tl.load(mom_ptr + offs * 3, mask=m, other=0.0)
    mean0 = tl.load(mom_ptr + offs * 3 + 1, mask=m, other=0.0)
    m20 = tl.load(mom_ptr + offs * 3 + 2, mask=m, other=0.0)
    cnt_acc = cnt0
    sum_acc = cnt0 * mean0
    for i0 in range(BLOCK, num_parts, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < num_parts
        cnt = tl.load(mom_ptr + offs * 3, mask=m, other=0.0)
        mean = tl.load(mom_ptr + offs * 3 + 1, mask=m, other=0.0)
        cnt_acc += cnt
        sum_acc += cnt * mean
    count = tl.sum(cnt_acc, 0)
    mean_all = tl.sum(sum_acc, 0) / count
    d0 = mean0 - mean_all
    m2_acc = tl.where(tl.arange(0, BLOCK) < num_parts, m20 + cnt0 * d0 * d0, 0.0)
    for i0 in range(BLOCK, num_parts, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < num_parts
        cnt = tl.load(mom_ptr + offs * 3, mask=m, other=0.0)
        mean = tl.load(mom_ptr + offs * 3 + 1, mask=m, other=0.0)
        m2 = tl.load(mom_ptr + offs * 3 + 2, mask=m, other=0.0)
        d = mean - mean_all
        m2_acc += tl.where(m, m2 + cnt * d * d, 0.0)
    return count, mean_all, tl.sum(m2_acc, 0) / count


@triton.jit
def _sum_pairs(part_ptr, num_parts, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """(sum a_i, sum b_i) over the rows (a_i, b_i) of part_ptr ([num_parts, 2]), fixed order."""
    a_acc = tl.zeros([BLOCK], ACC_DTYPE)
    b_acc = tl.zeros([BLOCK], ACC_DTYPE)
    for i0 in range(0, num_parts, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < num_parts
        a_acc += tl.load(part_ptr + offs * 2, mask=m, other=0.0)
        b_acc += tl.load(part_ptr + offs * 2 + 1, mask=m, other=0.0)
    return tl.sum(a_acc, 0), tl.sum(b_acc, 0)


@triton.jit
def _sum_partial_rows(part_ptr, n, num_parts, R, offs_r, mask_r, ACC_DTYPE: tl.constexpr,
                      BLOCK: tl.constexpr, STEP_ROWS: tl.constexpr):
    """sum_b part[n, b, r] for the rows offs_r of part_ptr ([N, num_parts, R]), in tiles
    of whole BLOCKs of partial rows, in a fixed order: the merge of a split reduction's sums.
    BLOCK == 1 means one row (plan.merge_block): a plain load, no loop (a loop of one step
    would cost its own memory round trip). A step of the loop loads STEP_ROWS rows at once
    in whole BLOCKs (the small maps: MERGE_ROWS_PER_STEP, so that a merge of B1's 25-98
    rows per sample waits on one to four round trips, not 4-13; a big pass, whose
    registers keep its programs resident: BLOCK)."""
    if BLOCK == 1:
        return tl.load(part_ptr + n.to(tl.int64) * R + offs_r, mask=mask_r, other=0.0)
    ROWS: tl.constexpr = BLOCK * ((STEP_ROWS + BLOCK - 1) // BLOCK)
    acc = tl.zeros(offs_r.shape, ACC_DTYPE)
    for b0 in range(0, num_parts, ROWS):
        offs_b = b0 + tl.arange(0, ROWS)
        m = mask_r[:, None] & (offs_b[None, :] < num_parts)
        part = tl.load(part_ptr + ((n.to(tl.int64) * num_parts + offs_b[None, :]) * R
                                   + offs_r[:, None]), mask=m, other=0.0)
        acc += tl.sum(part, 1)
    return acc


@triton.jit
def _elementwise_program(pid, num_c_blocks, num_p_groups, P_CONTIG: tl.constexpr):
    """(sample, channel block, position group) of program pid of F3 or B3: position groups
    vary fastest in NCHW, channel blocks in channels_last, so that neighbouring programs
    touch neighbouring memory."""
    if P_CONTIG:
        pg = pid % num_p_groups
        cb = (pid // num_p_groups) % num_c_blocks
    else:
        cb = pid % num_c_blocks
        pg = (pid // num_c_blocks) % num_p_groups
    n = pid // (num_c_blocks * num_p_groups)
    return n, cb, pg


@triton.jit
def _plane_tile(n, C, P, p0, p_end, offs_c, mask_c, P_CONTIG: tl.constexpr,
                BLOCK_P: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """The tile of sample n at channels offs_c and positions p0 .. p0 + BLOCK_P (before
    p_end): (positions, their mask, the tile's mask, its 64-bit offsets in the [N, C x P]
    plane, the positions' 64-bit offsets in an [N, P] row). ROW_ALIGN (NCHW): P and p_end
    are multiples of it (_plane_offsets, _below)."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask_p = _below(offs_p, p_end, ROW_ALIGN)
    mask = mask_c[:, None] & mask_p[None, :]
    plane = n.to(tl.int64) * C * P + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG, ROW_ALIGN)
    start = n.to(tl.int64) * P
    if ROW_ALIGN > 1:
        start = tl.multiple_of(start, ROW_ALIGN)
    return offs_p, mask_p, mask, plane, start + offs_p
