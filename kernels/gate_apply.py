"""Forward pass F3: out = x * ca * sa, the only pass that writes a full tensor.

With the spatial BatchNorm in batch-statistics mode (SA_MODE 2) the gate sa does not
exist yet when F3 starts: every program combines the (count, mean, M2) rows of
spatial_gate.py (one per spatial-map program) in the same fixed order (a few hundred
numbers, from L2), normalizes the conv output u of its positions and takes the sigmoid.
A program covers several position blocks where the launch stays large enough
(plan.elementwise_position_groups), so the combine runs once per group of tiles. The
programs of the first channel block store sa for the backward; program 0 stores the
statistics it used and updates the running statistics and the batch counter, as
nn.BatchNorm2d would.
"""
import triton
import triton.language as tl

from .plane import STAGES, _combine_moments, _elementwise_program, _plane_tile, _scalar


@triton.jit
def _gate_apply_tile(
    x_ptr, sa_ptr, u_ptr, out_ptr, n, C, P, p0, p_end, offs_c, mask_c, ca, cb,
    mean, invstd, bn_w, bn_b,
    SA_MODE: tl.constexpr, P_CONTIG: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """out of one tile: the channel block of offs_c (gate ca) and the positions
    p0 .. p0 + BLOCK_P (before p_end). SA_MODE 2: sa from u with the combined statistics
    (mean, invstd) and the affine factors, stored by the first channel block."""
    offs_p, mask_p, mask, plane, prow = _plane_tile(n, C, P, p0, p_end, offs_c, mask_c,
                                                    P_CONTIG, BLOCK_P, ROW_ALIGN)
    x = tl.load(x_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
    y = x * ca[:, None]
    if SA_MODE == 1:
        sa = tl.load(sa_ptr + prow, mask=mask_p, other=0.0)
        y = y * sa[None, :]
    elif SA_MODE == 2:
        s = (tl.load(u_ptr + prow, mask=mask_p, other=0.0) - mean) * invstd
        sa = tl.sigmoid(s * bn_w + bn_b)
        if cb == 0:
            tl.store(sa_ptr + prow, sa, mask=mask_p)
        y = y * sa[None, :]
    tl.store(out_ptr + plane, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_apply_kernel(
    x_ptr,    # [N, C x P plane], input dtype
    ca_ptr,   # [N, C] ACC_DTYPE  channel gate
    sa_ptr,   # [N, P] ACC_DTYPE  spatial gate: read (SA_MODE 1) or written (SA_MODE 2)
    u_ptr,    # [N, P] ACC_DTYPE  conv output (SA_MODE 2)
    mom_ptr,  # [NPARTS, 3] ACC_DTYPE (count, mean, M2) rows of u (SA_MODE 2)
    bnw_ptr, bnb_ptr,   # [1] BatchNorm affine (HAS_BN_W, HAS_BN_B)
    rm_ptr, rv_ptr,     # [1] running statistics, updated in place (TRACK)
    nbt_ptr,            # [1] int64 num_batches_tracked, incremented (HAS_NBT)
    bn_stats_ptr,       # [3] ACC_DTYPE out: (mean, invstd, count) used (SA_MODE 2)
    out_ptr,  # [N, C x P plane], input dtype, same layout as x
    C, P, num_c_blocks, num_p_groups,
    p_per_program,  # positions of one program: BLOCK_P, or a multiple of it (LOOP)
    NPARTS, eps_hi, eps_lo, mom_hi, mom_lo,
    SA_MODE: tl.constexpr,   # 0: no spatial gate, 1: sa given, 2: batch-statistics BatchNorm
    HAS_BN_W: tl.constexpr,
    HAS_BN_B: tl.constexpr,
    TRACK: tl.constexpr,
    HAS_NBT: tl.constexpr,
    P_CONTIG: tl.constexpr,  # True for NCHW, False for channels_last
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,  # BatchNorm rows combined at once (SA_MODE 2)
    LOOP: tl.constexpr,  # several position blocks per program, in a pipelined loop
    ROW_ALIGN: tl.constexpr,  # NCHW: H*W's known divisor (plane._plane_offsets)
):
    """out[c, p] = (x[c, p] * ca[c]) * sa[p], computed in ACC_DTYPE and rounded once.

    The product is formed in the same order as y = x * ca in F2, so the values the
    spatial max saw are the values that are scaled here. SA_MODE 2:
        mean, var = combined statistics of u;  invstd = 1 / sqrt(var + eps)
        sa = sigmoid((u - mean) * invstd * gamma + beta)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    A program takes one channel block and p_per_program positions: the gate rows and the
    BatchNorm statistics are formed once; with LOOP, the loop over its position blocks
    keeps the next tiles' loads in flight while the current one is computed.
    """
    pid = tl.program_id(0)
    n, cb, pg = _elementwise_program(pid, num_c_blocks, num_p_groups, P_CONTIG)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
    mean = tl.zeros([], ACC_DTYPE)
    invstd = mean
    bn_w = mean + 1.0
    bn_b = mean
    if SA_MODE == 2:
        count, mean, var = _combine_moments(mom_ptr, NPARTS, ACC_DTYPE, BLOCK_PARTS)
        invstd = 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, ACC_DTYPE))
        if HAS_BN_W:
            bn_w = tl.load(bnw_ptr).to(ACC_DTYPE)
        if HAS_BN_B:
            bn_b = tl.load(bnb_ptr).to(ACC_DTYPE)
        if pid == 0:
            offs3 = tl.arange(0, 4)
            stats = tl.where(offs3 == 0, mean, tl.where(offs3 == 1, invstd, count))
            tl.store(bn_stats_ptr + offs3, stats, mask=offs3 < 3)
            if TRACK:
                mom = _scalar(mom_hi, mom_lo, ACC_DTYPE)
                rm = tl.load(rm_ptr).to(ACC_DTYPE)
                rv = tl.load(rv_ptr).to(ACC_DTYPE)
                tl.store(rm_ptr, (rm * (1 - mom) + mean * mom).to(rm_ptr.dtype.element_ty))
                unbiased = var * (count / (count - 1))
                tl.store(rv_ptr, (rv * (1 - mom) + unbiased * mom).to(rv_ptr.dtype.element_ty))
            if HAS_NBT:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    p_start = pg * p_per_program
    p_end = tl.minimum(p_start + p_per_program, P)
    if LOOP:
        for p0 in tl.range(p_start, p_end, BLOCK_P, num_stages=STAGES):
            _gate_apply_tile(x_ptr, sa_ptr, u_ptr, out_ptr, n, C, P, p0, p_end, offs_c, mask_c,
                             ca, cb, mean, invstd, bn_w, bn_b, SA_MODE, P_CONTIG, ACC_DTYPE,
                             BLOCK_P, ROW_ALIGN)
    else:
        _gate_apply_tile(x_ptr, sa_ptr, u_ptr, out_ptr, n, C, P, p_start, p_end, offs_c, mask_c,
                         ca, cb, mean, invstd, bn_w, bn_b, SA_MODE, P_CONTIG, ACC_DTYPE, BLOCK_P,
                         ROW_ALIGN)
