"""The spatial map psi, forward and backward, one program per (sample, block of rows)
(docs/design.md section 8).

Per sample n, with the spatial statistics of y = x * ca (smean[p] = mean over channels,
smax[p] = max), and the conv input maps z_m (POOL_ORDER 0: [smax, smean], the official
order; 1: [smean, smax], timm and ultralytics; 2: [0.5*smean + 0.5*smax], timm Light):

    u[p]  = sum_m sum_t w[m, t] z_m[p + off(t)] (+ b)     k x k taps t, zero padding k//2
    s     = BatchNorm(u)    BN_MODE 0: none (s = u); 1: eval, running statistics;
                            2: batch statistics over every sample (and process)
    sa    = sigmoid(s)

BN_MODE 2 needs statistics of u over all N*H*W before any sa exists: each program writes
the (count, mean, M2) row of its rows and F3 (gate_apply.py) combines the rows in a fixed
order. Backward, from ds = dL/ds (= Gs * sa * (1 - sa), Gs from B1):

    BN 2: du = (ds - mean(ds) - uhat * mean(ds * uhat)) * invstd * gamma   (means over all)
    BN 1: du = ds * invstd * gamma;     BN 0: du = ds
    dz_m[q] = sum_t w[m, t] du[q - off(t)]      -> dsmean, dsmax
    dw[m, t] = sum_p du[p] z_m[p + off(t)],  db = sum_p du[p]   (per-program rows, summed
                                                                in weight_grads.py)

Each program owns ROWS rows of one sample's map (RB row blocks per sample, as many as
fill the GPU: plan.psi_rows). The conv needs k//2 halo rows on each side: the forward
merges F2's partials over its rows and the halo into its own slab of scratch and, after
a barrier, runs the conv as a stencil over BLOCK_Q positions at a time: the k*k taps
unrolled, each one load of the shifted positions and one multiply-add per position
(_conv_taps); a program of few positions gathers every tap of them at once instead
(plan.psi_conv). The backward's du is pointwise in inputs an earlier launch wrote (ds, u), so
it is formed at the taps directly, for the transposed conv and the weight gradient at
once: as a stencil (_bwd_conv_taps) or, for few positions, in one [BLOCK_Q, k*k] gather
(plan.psi_bwd_conv). No program reads what another program of the same launch writes.
"""
import triton
import triton.language as tl

from .plane import (MERGE_ROWS_PER_STEP, STAGES, _combine_moments, _combined_stats, _scalar,
                    _sum_pairs, _sum_partial_rows)


@triton.jit
def _tap_positions(offs_p, py, px, mask_p, H, W, T: tl.constexpr, KSIZE: tl.constexpr):
    """The positions p + off(T) of tap T of the k x k window (T = ty * k + tx, offset
    (ty - k//2, tx - k//2)) and whether they lie on the map (zero padding elsewhere);
    py, px: the row and column of each position p."""
    DY: tl.constexpr = T // KSIZE - KSIZE // 2
    DX: tl.constexpr = T % KSIZE - KSIZE // 2
    valid = mask_p & (py >= -DY) & (py < H - DY) & (px >= -DX) & (px < W - DX)
    return offs_p + (DY * W + DX), valid


@triton.jit
def _conv_taps(src0, src1, w_ptr, offs_p, mask_p, H, W, M: tl.constexpr, KSIZE: tl.constexpr,
               ACC_DTYPE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(a0, a1) at positions offs_p: a_m = sum_t w[m, t] src_m[p + off(t)], zero padding
    (the conv is a0 + a1). M = 1: map 0 alone (a1 = 0)."""
    KK: tl.constexpr = KSIZE * KSIZE
    py = offs_p // W
    px = offs_p - py * W
    a0 = tl.zeros([BLOCK_Q], ACC_DTYPE)
    a1 = tl.zeros([BLOCK_Q], ACC_DTYPE)
    for t in tl.static_range(KK):
        q, valid = _tap_positions(offs_p, py, px, mask_p, H, W, t, KSIZE)
        w0 = w_ptr + t
        a0 += tl.load(w0).to(ACC_DTYPE) * tl.load(src0 + q, mask=valid, other=0.0)
        if M == 2:
            a1 += tl.load(w0 + KK).to(ACC_DTYPE) * tl.load(src1 + q, mask=valid, other=0.0)
    return a0, a1


@triton.jit
def _taps(offs_p, mask_p, H, W, KSIZE: tl.constexpr, KK_PAD: tl.constexpr, SIGN: tl.constexpr):
    """[BLOCK_Q, KK_PAD] flat indices and validity of the positions (py, px) + SIGN * off(t)
    for every tap t of the k x k window (t < k*k), and the tap indices [KK_PAD]."""
    t = tl.arange(0, KK_PAD)
    dy = t // KSIZE - KSIZE // 2
    dx = t % KSIZE - KSIZE // 2
    qy = (offs_p // W)[:, None] + SIGN * dy[None, :]
    qx = (offs_p % W)[:, None] + SIGN * dx[None, :]
    valid = (mask_p[:, None] & (t[None, :] < KSIZE * KSIZE)
             & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W))
    return qy * W + qx, valid, t


@triton.jit
def _conv_inputs(smean_ptr, smax_ptr, q, valid, POOL_ORDER: tl.constexpr):
    """(z_0, z_1) at positions q, zero outside the map (z_1 unused for POOL_ORDER 2)."""
    zmean = tl.load(smean_ptr + q, mask=valid, other=0.0)
    zmax = tl.load(smax_ptr + q, mask=valid, other=0.0)
    if POOL_ORDER == 0:
        return zmax, zmean
    elif POOL_ORDER == 1:
        return zmean, zmax
    else:
        return 0.5 * zmean + 0.5 * zmax, zmax


@triton.jit
def _row_block(pid, H, W, ROWS, RB, PAD: tl.constexpr):
    """(sample, first and end flat positions of the program's own rows, and of those rows
    with PAD halo rows on each side, clipped to the map) of program pid = n * RB + rb."""
    n = pid // RB
    r0 = (pid % RB) * ROWS
    r1 = tl.minimum(r0 + ROWS, H)
    e0 = tl.maximum(r0 - PAD, 0)
    e1 = tl.minimum(r1 + PAD, H)
    return n, r0 * W, r1 * W, e0 * W, e1 * W


@triton.jit
def _spatial_gate_fwd_kernel(
    psum_ptr, pmax_ptr,   # [N, S, P] ACC_DTYPE  F2 partials over S splits of the channels
    pidx_ptr, pcnt_ptr,   # [N, S, P] int32
    convw_ptr,            # [1, M, K, K] any float dtype (M = 1 for POOL_ORDER 2, else 2)
    convb_ptr,            # [1] (HAS_CONV_BIAS)
    bnw_ptr, bnb_ptr,     # [1] BatchNorm affine (HAS_BN_W, HAS_BN_B)
    rm_ptr, rv_ptr,       # [1] running statistics (BN_MODE 1)
    smean_ptr, smax_ptr,  # [N, P] ACC_DTYPE out: channel mean and max of y
    sidx_ptr, scnt_ptr,   # [N, P] int32 out: first argmax channel, tie count
    u_ptr,                # [N, P] ACC_DTYPE out: conv output
    sa_ptr,               # [N, P] ACC_DTYPE out: spatial gate (BN_MODE 0, 1)
    mom_ptr,              # [N * RB, 3] ACC_DTYPE out: (count, mean, M2) of u per program
                          # (BN_MODE 2)
    bn_stats_ptr,         # [3] ACC_DTYPE out: (mean, invstd, count) used (BN_MODE 1; zeros for 0)
    slab_ptr,             # [N * RB, 2, SLAB] ACC_DTYPE scratch: the conv inputs of each program
    C, H, W, S, ROWS, RB, SLAB, eps_hi, eps_lo,
    POOL_ORDER: tl.constexpr,
    KSIZE: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    BN_MODE: tl.constexpr,
    HAS_BN_W: tl.constexpr,
    HAS_BN_B: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,   # positions per step of the merge
    BLOCK_S: tl.constexpr,   # >= S
    STENCIL: tl.constexpr,   # the conv as a stencil (BLOCK_Q positions a step, taps unrolled);
                             # else as [BLOCK_Q, KK_PAD] tap gathers (few positions a program)
    KK_PAD: tl.constexpr,    # next power of two >= KSIZE * KSIZE
    BLOCK_Q: tl.constexpr,   # positions per step of the conv
):
    """One program per (sample, block of ROWS rows): combine F2's partials over its rows
    and their halo (KSIZE // 2 rows each side) into its own slab, then u = conv(z) on its
    rows and, unless BN_MODE 2, sa = sigmoid(BN(u)); with BN_MODE 2 the (count, mean, M2)
    of its u. The halo is recomputed by each neighbour (from the same partials, so equal),
    never read from another program's stores."""
    pid = tl.program_id(0)
    n, o0, o1, e0, e1 = _row_block(pid, H, W, ROWS, RB, KSIZE // 2)
    P = H * W
    row = n.to(tl.int64) * P
    slab = slab_ptr + pid.to(tl.int64) * 2 * SLAB - e0   # indexed by flat position
    for p0 in tl.range(e0, e1, BLOCK_P, num_stages=STAGES):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < e1
        total, m, idx, cnt = _combined_stats(psum_ptr, pmax_ptr, pidx_ptr, pcnt_ptr,
                                             row * S, P, S, offs_p, mask_p, BLOCK_S)
        mean = total / tl.cast(C, ACC_DTYPE)
        if POOL_ORDER == 2:  # the one conv input map
            tl.store(slab + offs_p, 0.5 * mean + 0.5 * m, mask=mask_p)
        else:
            tl.store(slab + offs_p, mean, mask=mask_p)
            tl.store(slab + SLAB + offs_p, m, mask=mask_p)
        own = mask_p & (offs_p >= o0) & (offs_p < o1)
        tl.store(smean_ptr + row + offs_p, mean, mask=own)
        tl.store(smax_ptr + row + offs_p, m, mask=own)
        tl.store(sidx_ptr + row + offs_p, idx, mask=own)
        tl.store(scnt_ptr + row + offs_p, cnt, mask=own)
    tl.debug_barrier()  # the conv reads slab entries that other threads stored

    if BN_MODE == 1:
        mean = tl.load(rm_ptr).to(ACC_DTYPE)
        invstd = 1.0 / tl.sqrt(tl.load(rv_ptr).to(ACC_DTYPE) + _scalar(eps_hi, eps_lo, ACC_DTYPE))
        if pid == 0:
            tl.store(bn_stats_ptr, mean)
            tl.store(bn_stats_ptr + 1, invstd)
            tl.store(bn_stats_ptr + 2, tl.cast(0, ACC_DTYPE))
    elif BN_MODE == 0:
        if pid == 0:  # no BatchNorm: defined zeros (the saved workspace is an op's output)
            tl.store(bn_stats_ptr + tl.arange(0, 4), tl.zeros([4], ACC_DTYPE),
                     mask=tl.arange(0, 4) < 3)
    usum = tl.zeros([BLOCK_Q], ACC_DTYPE)
    M: tl.constexpr = 1 if POOL_ORDER == 2 else 2
    # conv input maps z_0, z_1 in the slab: [mean | max], or the one map (POOL_ORDER 2)
    z0 = slab + SLAB if POOL_ORDER == 0 else slab
    z1 = slab if POOL_ORDER == 0 else slab + SLAB
    KK: tl.constexpr = KSIZE * KSIZE
    if not STENCIL:  # the gathers' weight rows, read once
        t = tl.arange(0, KK_PAD)
        w0 = tl.load(convw_ptr + t, mask=t < KK, other=0.0).to(ACC_DTYPE)
        w1 = tl.load(convw_ptr + KK + t, mask=(t < KK) & (M == 2), other=0.0).to(ACC_DTYPE)
    for p0 in range(o0, o1, BLOCK_Q):
        offs_p = p0 + tl.arange(0, BLOCK_Q)
        mask_p = offs_p < o1
        if STENCIL:
            a0, a1 = _conv_taps(z0, z1, convw_ptr, offs_p, mask_p, H, W, M, KSIZE,
                                ACC_DTYPE, BLOCK_Q)
        else:  # every tap of every position in one gather: [BLOCK_Q, KK_PAD]
            q, valid, _ = _taps(offs_p, mask_p, H, W, KSIZE, KK_PAD, 1)
            a0 = tl.sum(tl.load(z0 + q, mask=valid, other=0.0) * w0[None, :], 1)
            a1 = a0
            if M == 2:
                a1 = tl.sum(tl.load(z1 + q, mask=valid, other=0.0) * w1[None, :], 1)
        acc = a0 + a1 if M == 2 else a0
        if HAS_CONV_BIAS:
            acc += tl.load(convb_ptr).to(ACC_DTYPE)
        tl.store(u_ptr + row + offs_p, acc, mask=mask_p)
        if BN_MODE == 2:
            usum += tl.where(mask_p, acc, 0.0)
        else:
            s = acc
            if BN_MODE == 1:
                s = (s - mean) * invstd
                if HAS_BN_W:
                    s = s * tl.load(bnw_ptr).to(ACC_DTYPE)
                if HAS_BN_B:
                    s = s + tl.load(bnb_ptr).to(ACC_DTYPE)
            tl.store(sa_ptr + row + offs_p, tl.sigmoid(s), mask=mask_p)
    if BN_MODE == 2:
        # two passes over this program's u: mean, then the sum of squared deviations
        count = tl.cast(o1 - o0, ACC_DTYPE)
        mean_n = tl.sum(usum, 0) / count
        tl.debug_barrier()
        m2 = tl.zeros([BLOCK_Q], ACC_DTYPE)
        for p0 in range(o0, o1, BLOCK_Q):
            offs_p = p0 + tl.arange(0, BLOCK_Q)
            mask_p = offs_p < o1
            d = tl.load(u_ptr + row + offs_p, mask=mask_p, other=0.0) - mean_n
            m2 += tl.where(mask_p, d * d, 0.0)
        tl.store(mom_ptr + pid * 3, count)
        tl.store(mom_ptr + pid * 3 + 1, mean_n)
        tl.store(mom_ptr + pid * 3 + 2, tl.sum(m2, 0))


@triton.jit
def _spatial_gate_bwd_stats_kernel(
    gs_part_ptr,   # [N, CS, P] ACC_DTYPE B1's partial rows of Gs over CS channel splits
    sa_ptr,        # [N, P] ACC_DTYPE
    u_ptr,         # [N, P] ACC_DTYPE (BN_MODE > 0)
    bn_stats_ptr,  # [3] (mean, invstd, count) the forward normalized with (BN_MODE > 0)
    ds_ptr,        # [N, P] ACC_DTYPE out: dL/ds
    sums_ptr,      # [N * RB, 2] ACC_DTYPE out: (sum ds, sum ds * uhat) per program (BN_MODE > 0)
    H, W, CS, ROWS, RB,
    BN_MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CS: tl.constexpr,
):
    """ds = Gs * sa * (1 - sa) on one (sample, block of ROWS rows), and its
    BatchNorm-backward sums."""
    pid = tl.program_id(0)
    n, o0, o1, e0, e1 = _row_block(pid, H, W, ROWS, RB, 0)  # no halo: e0, e1 = o0, o1
    P = H * W
    row = n.to(tl.int64) * P
    if BN_MODE > 0:
        mean = tl.load(bn_stats_ptr)
        invstd = tl.load(bn_stats_ptr + 1)
    acc_ds = tl.zeros([BLOCK_P], ACC_DTYPE)
    acc_dsu = tl.zeros([BLOCK_P], ACC_DTYPE)
    for p0 in range(o0, o1, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < o1
        gs = _sum_partial_rows(gs_part_ptr, n, CS, P, offs_p, mask_p, ACC_DTYPE, BLOCK_CS,
                               MERGE_ROWS_PER_STEP)
        sa = tl.load(sa_ptr + row + offs_p, mask=mask_p, other=0.0)
        ds = gs * (sa * (1 - sa))
        tl.store(ds_ptr + row + offs_p, ds, mask=mask_p)
        if BN_MODE > 0:
            uhat = (tl.load(u_ptr + row + offs_p, mask=mask_p, other=0.0) - mean) * invstd
            acc_ds += tl.where(mask_p, ds, 0.0)
            acc_dsu += tl.where(mask_p, ds * uhat, 0.0)
    if BN_MODE > 0:
        tl.store(sums_ptr + pid * 2, tl.sum(acc_ds, 0))
        tl.store(sums_ptr + pid * 2 + 1, tl.sum(acc_dsu, 0))


@triton.jit
def _spatial_gate_bwd_kernel(
    ds_ptr,        # [N, P] ACC_DTYPE dL/ds
    u_ptr,         # [N, P] ACC_DTYPE (BN_MODE 2)
    bn_stats_ptr,  # [3] (mean, invstd, count) (BN_MODE > 0)
    sums_ptr,      # [NPARTS, 2] (sum ds, sum ds*uhat) rows of every program (and process)
                   # (BN_MODE 2)
    bnw_ptr,       # [1] (HAS_BN_W)
    convw_ptr,     # [1, M, K, K]
    smean_ptr, smax_ptr,   # [N, P] ACC_DTYPE conv input maps (for the weight gradient)
    dsmean_ptr, dsmax_ptr, # [N, P] ACC_DTYPE out
    cgrad_ptr,     # [N * RB, M*K*K + 1] ACC_DTYPE out: the conv weight and bias gradients of
                   # each program's rows
    cpart_ptr,     # [N * RB, GRAD_ROWS, M*K*K + 1] ACC_DTYPE scratch: each program's rows of
                   # per-warp partial sums (STENCIL)
    H, W, ROWS, RB, NPARTS,
    POOL_ORDER: tl.constexpr,
    KSIZE: tl.constexpr,
    BN_MODE: tl.constexpr,
    HAS_BN_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,  # BatchNorm rows summed at once
    STENCIL: tl.constexpr,   # the conv as a stencil (taps unrolled, BLOCK_Q positions a
                             # step); else as [BLOCK_Q, KK_PAD] tap gathers
    KK_PAD: tl.constexpr,    # next power of two >= KSIZE * KSIZE
    BLOCK_Q: tl.constexpr,   # positions per step of the conv
    GRAD_ROWS: tl.constexpr, # STENCIL: position groups (warps) of a program, each summing
                             # its own partial conv gradient row
):
    """dsmean/dsmax through the conv and the conv gradient rows of one (sample, block of
    ROWS rows). du is pointwise in (ds, u), so the transposed conv forms du at the tap
    positions itself (halo included) and no program reads another's stores."""
    pid = tl.program_id(0)
    n, o0, o1, e0, e1 = _row_block(pid, H, W, ROWS, RB, 0)  # no halo: e0, e1 = o0, o1
    P = H * W
    row = n.to(tl.int64) * P
    KK: tl.constexpr = KSIZE * KSIZE
    M: tl.constexpr = 1 if POOL_ORDER == 2 else 2
    mean = 0.0   # BatchNorm terms, read below where BN_MODE uses them
    invstd = 1.0
    scale = 1.0
    mean_dy = 0.0
    mean_dyu = 0.0
    if BN_MODE > 0:
        mean = tl.load(bn_stats_ptr)
        invstd = tl.load(bn_stats_ptr + 1)
        scale = invstd
        if HAS_BN_W:
            scale = invstd * tl.load(bnw_ptr).to(ACC_DTYPE)
    if BN_MODE == 2:
        count = tl.load(bn_stats_ptr + 2)
        total_ds, total_dsu = _sum_pairs(sums_ptr, NPARTS, ACC_DTYPE, BLOCK_PARTS)
        mean_dy = total_ds / count
        mean_dyu = total_dsu / count

    CG: tl.constexpr = M * KK + 1  # entries of a conv gradient row: weights, bias
    if STENCIL:  # the program's positions in one step (plan.psi_rows, psi_bwd_conv)
        # [R, G, 32]: warp g takes positions g*32 .. g*32+31 of every 32*G, R of each
        G: tl.constexpr = GRAD_ROWS
        R: tl.constexpr = BLOCK_Q // (32 * G)
        r_idx = tl.arange(0, R)[:, None, None]
        group = tl.arange(0, G)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        offs_p = o0 + (r_idx * (32 * G) + group * 32 + lane)
        mask_p = offs_p < o1
        du_p = _du(ds_ptr + row, u_ptr + row, offs_p, mask_p, mean, invstd, scale, mean_dy,
                   mean_dyu, BN_MODE)
        # the group's gradient row at every position of the group, stored from its first:
        # the sums stay in the layout they are reduced in (stored as [G] they would go
        # through shared memory, two barriers a tap)
        zeros = tl.zeros([R, G, 32], tl.int32)
        parts = cpart_ptr + pid.to(tl.int64) * (G * CG)  # this program's G partial rows
        group_rows = parts + (group + zeros) * CG
        lead = (r_idx + lane + zeros) == 0
        dz0, dz1 = _bwd_conv_taps(ds_ptr + row, u_ptr + row, smean_ptr + row, smax_ptr + row,
                                  convw_ptr, group_rows, lead, offs_p, mask_p, du_p, H, W,
                                  mean, invstd, scale, mean_dy, mean_dyu, BN_MODE, POOL_ORDER,
                                  KSIZE, ACC_DTYPE)
        _store_dz(dsmean_ptr + row, dsmax_ptr + row, offs_p, mask_p, dz0, dz1, POOL_ORDER)
        tl.store(group_rows + M * KK, _group_sums(du_p), mask=lead)
        tl.debug_barrier()  # the partial rows, stored by each warp, read by every thread
        crow = cgrad_ptr + pid.to(tl.int64) * CG
        for c0 in tl.static_range(0, 3 * KK_PAD, KK_PAD):  # 3 KK_PAD >= CG = M KK + 1
            cols = c0 + tl.arange(0, KK_PAD)
            part = tl.load(parts + tl.arange(0, G)[:, None] * CG + cols[None, :],
                           mask=cols[None, :] < CG, other=0.0)
            tl.store(crow + cols, tl.sum(part, 0), mask=cols < CG)
    else:
        crow = cgrad_ptr + pid.to(tl.int64) * CG  # this program's gradient row
        t = tl.arange(0, KK_PAD)
        # The window is symmetric: off(KK - 1 - t) = -off(t). So the transposed conv
        # dz[p] = sum_t w[t] du[p - off(t)] = sum_t w[KK - 1 - t] du[p + off(t)] gathers at
        # the same taps p + off(t) as the weight gradient: one set of indices, flipped
        # weights (read once).
        flip = KK - 1 - t
        w0f = tl.load(convw_ptr + flip, mask=t < KK, other=0.0).to(ACC_DTYPE)
        w1f = tl.load(convw_ptr + KK + flip, mask=(t < KK) & (M == 2), other=0.0).to(ACC_DTYPE)
        bsum = tl.zeros([BLOCK_Q], ACC_DTYPE)
        g0 = tl.zeros([KK_PAD], ACC_DTYPE)   # per-tap weight gradient of this program's rows
        g1 = tl.zeros([KK_PAD], ACC_DTYPE)
        for p0 in range(o0, o1, BLOCK_Q):
            offs_p = p0 + tl.arange(0, BLOCK_Q)
            mask_p = offs_p < o1
            # one gather [BLOCK_Q, KK_PAD] of du and z at the taps p + off(t)
            q, valid, _ = _taps(offs_p, mask_p, H, W, KSIZE, KK_PAD, 1)
            d = _du(ds_ptr + row, u_ptr + row, q, valid, mean, invstd, scale, mean_dy,
                    mean_dyu, BN_MODE)
            # transposed conv: dz[p] = sum_t w[KK - 1 - t] du[p + off(t)]
            dz0 = tl.sum(tl.where(valid, w0f[None, :] * d, 0.0), 1)
            dz1 = tl.sum(tl.where(valid, w1f[None, :] * d, 0.0), 1)
            # weight gradient: dw[t] += sum_p du[p] z[p + off(t)]
            du_p = _du(ds_ptr + row, u_ptr + row, offs_p, mask_p, mean, invstd, scale,
                       mean_dy, mean_dyu, BN_MODE)
            z0, z1 = _conv_inputs(smean_ptr + row, smax_ptr + row, q, valid, POOL_ORDER)
            g0 += tl.sum(tl.where(valid, du_p[:, None] * z0, 0.0), 0)
            if M == 2:
                g1 += tl.sum(tl.where(valid, du_p[:, None] * z1, 0.0), 0)
            bsum += tl.where(mask_p, du_p, 0.0)
            _store_dz(dsmean_ptr + row, dsmax_ptr + row, offs_p, mask_p, dz0, dz1, POOL_ORDER)
        tl.store(crow + t, g0, mask=t < KK)
        if M == 2:
            tl.store(crow + KK + t, g1, mask=t < KK)
        tl.store(crow + M * KK + t, tl.where(t == 0, tl.sum(bsum, 0), 0.0), mask=t == 0)


@triton.jit
def _store_dz(dsmean_ptr, dsmax_ptr, offs_p, mask_p, dz0, dz1, POOL_ORDER: tl.constexpr):
    """dsmean and dsmax at positions offs_p from the conv input maps' gradients dz_m."""
    if POOL_ORDER == 0:
        dmean, dmax = dz1, dz0
    elif POOL_ORDER == 1:
        dmean, dmax = dz0, dz1
    else:  # z_0 = 0.5 * smean + 0.5 * smax
        dmean = 0.5 * dz0
        dmax = dmean
    tl.store(dsmean_ptr + offs_p, dmean, mask=mask_p)
    tl.store(dsmax_ptr + offs_p, dmax, mask=mask_p)


@triton.jit
def _bwd_conv_taps(ds_ptr, u_ptr, smean_ptr, smax_ptr, w_ptr, group_rows, lead, offs_p,
                   mask_p, du_p, H, W, mean, invstd, scale, mean_dy, mean_dyu,
                   BN_MODE: tl.constexpr, POOL_ORDER: tl.constexpr, KSIZE: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    """The transposed conv (dz_0, dz_1) at positions offs_p ([R, G, 32]: G groups, one per
    warp), returned, and the weight gradient entries sum_p du[p] z_m[p + off(T)] of every
    tap T, one partial sum per group, stored at group_rows + m * KK + T where lead (the
    group's first position): per tap a sum within each warp, no block-wide reduction.
    A stencil: per row of the window (_bwd_conv_row, in a loop, so only two rows' weights
    are live), its k taps unrolled, each one load of du's inputs and of each conv input
    map at the shifted positions (constant offsets from the row's pointers) and two
    multiply-adds per position. The window is symmetric (off(KK - 1 - t) = -off(t)), so the transposed
    conv dz[p] = sum_t w[t] du[p - off(t)] = sum_t w[KK - 1 - t] du[p + off(t)] reads the
    same shifted positions as the weight gradient, with flipped weights."""
    py = offs_p // W
    px = offs_p - py * W
    dz0 = tl.zeros(offs_p.shape, ACC_DTYPE)
    dz1 = tl.zeros(offs_p.shape, ACC_DTYPE)
    # a loop over the window's rows: unrolled, the window's weights crowd the registers
    # (spills); two rows a step, whose loads are independent and issue together (k odd:
    # row 0 first, on its own)
    dz0, dz1 = _bwd_conv_row(0, dz0, dz1, ds_ptr, u_ptr, smean_ptr, smax_ptr, w_ptr,
                             group_rows, lead, offs_p, mask_p, py, px, du_p, H, W, mean,
                             invstd, scale, mean_dy, mean_dyu, BN_MODE, POOL_ORDER, KSIZE,
                             ACC_DTYPE)
    for ty in range(1, KSIZE, 2):
        for j in tl.static_range(2):
            dz0, dz1 = _bwd_conv_row(ty + j, dz0, dz1, ds_ptr, u_ptr, smean_ptr, smax_ptr,
                                     w_ptr, group_rows, lead, offs_p, mask_p, py, px, du_p,
                                     H, W, mean, invstd, scale, mean_dy, mean_dyu, BN_MODE,
                                     POOL_ORDER, KSIZE, ACC_DTYPE)
    return dz0, dz1


@triton.jit
def _bwd_conv_row(ty, dz0, dz1, ds_ptr, u_ptr, smean_ptr, smax_ptr, w_ptr, group_rows, lead,
                  offs_p, mask_p, py, px, du_p, H, W, mean, invstd, scale, mean_dy, mean_dyu,
                  BN_MODE: tl.constexpr, POOL_ORDER: tl.constexpr, KSIZE: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    """Row ty of _bwd_conv_taps' window: its k taps unrolled, (dz0, dz1) with their terms
    added, and their weight-gradient entries stored."""
    KK: tl.constexpr = KSIZE * KSIZE
    M: tl.constexpr = 1 if POOL_ORDER == 2 else 2
    dy = ty - KSIZE // 2
    # one unsigned compare per axis: a row or column before 0 wraps to a large value
    row_ok = mask_p & ((py + dy).to(tl.uint32) < tl.cast(H, tl.uint32))
    q_row = offs_p + dy * W
    # pointers at the row's positions: each tap adds a constant (an address immediate)
    ds_row, u_row = ds_ptr + q_row, u_ptr + q_row
    smean_row, smax_row = smean_ptr + q_row, smax_ptr + q_row
    for tx in tl.static_range(KSIZE):
        dx = tx - KSIZE // 2
        valid = row_ok & ((px + dx).to(tl.uint32) < tl.cast(W, tl.uint32))
        tap = ty * KSIZE + tx
        d = _du(ds_row, u_row, dx, valid, mean, invstd, scale, mean_dy, mean_dyu, BN_MODE)
        wf = w_ptr + (KK - 1 - tap)
        dz0 += tl.load(wf).to(ACC_DTYPE) * d
        z0, z1 = _conv_inputs(smean_row, smax_row, dx, valid, POOL_ORDER)
        tl.store(group_rows + tap, _group_sums(du_p * z0), mask=lead)
        if M == 2:
            dz1 += tl.load(wf + KK).to(ACC_DTYPE) * d
            tl.store(group_rows + (KK + tap), _group_sums(du_p * z1), mask=lead)
    return dz0, dz1


@triton.jit
def _group_sums(v):
    """The sum of v ([R, G, 32]) over each group's positions, at each of them: within
    each thread, then across the warp's lanes."""
    return tl.sum(tl.sum(v, 0, keep_dims=True), 2, keep_dims=True) + tl.zeros_like(v)


@triton.jit
def _du(ds_ptr, u_ptr, q, valid, mean, invstd, scale, mean_dy, mean_dyu, BN_MODE: tl.constexpr):
    """dL/du at positions q (zero where not valid), through the BatchNorm:
    BN 2: (ds - mean(ds) - uhat * mean(ds * uhat)) * invstd * gamma; BN 1: ds * invstd *
    gamma; BN 0: ds."""
    du = tl.load(ds_ptr + q, mask=valid, other=0.0)
    if BN_MODE == 2:
        uhat = (tl.load(u_ptr + q, mask=valid, other=0.0) - mean) * invstd
        du = tl.where(valid, (du - mean_dy - uhat * mean_dyu) * scale, 0.0)
    elif BN_MODE == 1:
        du = du * scale
    return du


@triton.jit
def _bn_partials_reduce_kernel(
    part_ptr,   # [NPARTS, 3] (count, mean, M2) rows (MOMENTS) or [NPARTS, 2] (sum, sum) rows
    out_ptr,    # [3] or [2] ACC_DTYPE: the one row of this process, for SyncBatchNorm's all_gather
    NPARTS,
    MOMENTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """This process's per-sample BatchNorm rows combined into one, in a fixed order."""
    if MOMENTS:
        count, mean, var = _combine_moments(part_ptr, NPARTS, ACC_DTYPE, 64)
        tl.store(out_ptr, count)
        tl.store(out_ptr + 1, mean)
        tl.store(out_ptr + 2, var * count)
    else:
        a, b = _sum_pairs(part_ptr, NPARTS, ACC_DTYPE, 64)
        tl.store(out_ptr, a)
        tl.store(out_ptr + 1, b)
