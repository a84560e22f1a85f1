"""Forward pass F3: out = x * ca * sa, the only pass that writes a full tensor.

With the spatial BatchNorm in batch-statistics mode (SA_MODE 2) the gate sa does not
exist yet when F3 starts: every program combines the (count, mean, M2) rows of
spatial_gate.py (one per spatial-map program) in the same fixed order (a few hundred
numbers, from L2), normalizes the conv output u of its positions and takes the sigmoid. The programs of the first
channel block store sa for the backward; program 0 stores the statistics it used and
updates the running statistics and the batch counter, as nn.BatchNorm2d would.
"""
import triton
import triton.language as tl

from .plane import _combine_moments, _plane_offsets, _scalar


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
    C, P, num_c_blocks, num_p_blocks, NPARTS, eps_hi, eps_lo, mom_hi, mom_lo,
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
):
    """out[c, p] = (x[c, p] * ca[c]) * sa[p], computed in ACC_DTYPE and rounded once.

    The product is formed in the same order as y = x * ca in F2, so the values the
    spatial max saw are the values that are scaled here. SA_MODE 2:
        mean, var = combined statistics of u;  invstd = 1 / sqrt(var + eps)
        sa = sigmoid((u - mean) * invstd * gamma + beta)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    """
    pid = tl.program_id(0)
    if P_CONTIG:
        pb = pid % num_p_blocks
        cb = (pid // num_p_blocks) % num_c_blocks
    else:
        cb = pid % num_c_blocks
        pb = (pid // num_c_blocks) % num_p_blocks
    n = pid // (num_c_blocks * num_p_blocks)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_c[:, None] & mask_p[None, :]
    plane = n.to(tl.int64) * C * P + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG)
    prow = n.to(tl.int64) * P + offs_p

    x = tl.load(x_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
    ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
    y = x * ca[:, None]
    if SA_MODE == 1:
        sa = tl.load(sa_ptr + prow, mask=mask_p, other=0.0)
        y = y * sa[None, :]
    elif SA_MODE == 2:
        count, mean, var = _combine_moments(mom_ptr, NPARTS, ACC_DTYPE, BLOCK_PARTS)
        invstd = 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, ACC_DTYPE))
        s = (tl.load(u_ptr + prow, mask=mask_p, other=0.0) - mean) * invstd
        if HAS_BN_W:
            s = s * tl.load(bnw_ptr).to(ACC_DTYPE)
        if HAS_BN_B:
            s = s + tl.load(bnb_ptr).to(ACC_DTYPE)
        sa = tl.sigmoid(s)
        if cb == 0:
            tl.store(sa_ptr + prow, sa, mask=mask_p)
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
        y = y * sa[None, :]
    tl.store(out_ptr + plane, y.to(out_ptr.dtype.element_ty), mask=mask)
