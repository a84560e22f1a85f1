"""Backward passes B1, B2, B3 (docs/design.md section 5): 5|x| of memory traffic.

Notation, per sample: x[c, p], g = dL/dout, ca[c], sa[p], y = x * ca,
out = y * sa. smean/smax are the spatial pools of y over c (argmax k[p]),
avg/mx the channel pools of x over p (argmax j[c]).

    B1  read g, x:  Gs[p]  = sum_c g*x*ca            (= dL/dsa)
                    Gc1[c] = sum_p g*x*sa            (direct part of dL/dca)
    B2  read x:     Gc2[c] = sum_p x*(dsmean[p]/C + dsmax[p]*e_k[c, p])   (partial rows over
                    splits of the positions, merged by the channel map's backward; unsplit,
                    B2 itself forms dlogits and the W2^T dlogits partial rows)
    B3  read g, write dx:
        dx = (g*sa + dsmean/C + dsmax*e_k)*ca + davg/P + dmx*e_j

e_k / e_j are one-hot at the first argmax (torch.max semantics), or, with AMAX,
1/count on every tied maximum (torch.amax semantics). B3 reads x only near tied
maxima (the rows, or the elements, that hold one: docs/design.md section 8); elsewhere the
stored argmax decides. B3 runs by rows where the contiguous axis is a multiple of 16
elements and a warp wide (_bwd_input_rows_kernel, plan.b3_rows), else by tiles.
"""
import triton
import triton.language as tl

from .channel_gate import _weight_slice_products
from .plane import (STAGES, _below, _elementwise_program, _plane_offsets, _plane_tile,
                    _sum_partial_rows)


@triton.jit
def _bwd_gate_sums_kernel(
    g_ptr,        # [N, C x P plane], input dtype
    x_ptr,        # [N, C x P plane], input dtype
    ca_ptr,       # [N, C] ACC_DTYPE
    sa_ptr,       # [N, P] ACC_DTYPE (HAS_SA)
    gs_part_ptr,  # [N, CS, P] ACC_DTYPE  partial sums of Gs over each channel split
    gc_part_ptr,  # [N, PB, C] ACC_DTYPE  partial sums of Gc1 over each position block
    C, P,
    c_per_split,  # channels per split, a multiple of BLOCK_C
    num_p_blocks, num_c_splits,
    HAS_SA: tl.constexpr,
    P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop (1: none)
    ROW_ALIGN: tl.constexpr,   # NCHW: H*W's known divisor (plane._plane_offsets)
):
    """One program owns a block of positions and a range of channels:
         gs_part[cs, p]  = sum_{c in split cs} g*x*ca[c]
         gc_part[pb, c]  = sum_{p in block pb} g*x*sa[p]
    The host sums the partial rows in a fixed order (no atomics).
    """
    pid = tl.program_id(0)
    pb = pid % num_p_blocks
    cs = (pid // num_p_blocks) % num_c_splits
    n = pid // (num_p_blocks * num_c_splits)

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = _below(offs_p, P, ROW_ALIGN)  # ROW_ALIGN > 1 in NCHW only (plan.row_align)
    base = n.to(tl.int64) * C * P
    if HAS_SA:
        sa = tl.load(sa_ptr + n.to(tl.int64) * P + offs_p, mask=mask_p, other=0.0)
    gs = tl.zeros([BLOCK_P], ACC_DTYPE)
    c_start = cs * c_per_split
    c_end = tl.minimum(c_start + c_per_split, C)
    for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=NUM_STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        mask = mask_c[:, None] & mask_p[None, :]
        plane = base + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG, ROW_ALIGN)
        g = tl.load(g_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
        x = tl.load(x_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
        ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
        gx = g * x
        if HAS_SA:
            gs += tl.sum(gx * ca[:, None], 0)
            gc = tl.sum(gx * sa[None, :], 1)
        else:
            gc = tl.sum(gx, 1)
        tl.store(gc_part_ptr + (n.to(tl.int64) * num_p_blocks + pb) * C + offs_c, gc, mask=mask_c)
    if HAS_SA:
        tl.store(gs_part_ptr + (n.to(tl.int64) * num_c_splits + cs) * P + offs_p, gs, mask=mask_p)


@triton.jit
def _bwd_spatial_pool_kernel(
    x_ptr,        # [N, C x P plane], input dtype
    ca_ptr,       # [N, C] ACC_DTYPE
    dsmean_ptr,   # [N, P] ACC_DTYPE  dL/dsmean
    dsmax_ptr,    # [N, P] ACC_DTYPE  dL/dsmax
    smax_ptr,     # [N, P] ACC_DTYPE  spatial max of y (AMAX)
    sidx_ptr,     # [N, P] int32      first channel reaching it
    scnt_ptr,     # [N, P] int32      number of channels reaching it (AMAX)
    gc2_part_ptr,  # [N, PS, C] ACC_DTYPE  output: partial sums of Gc2 over PS position splits
                   # (not DR_PARTIAL)
    gc_part_ptr,   # [N, PB, C] ACC_DTYPE  B1's partial rows of Gc1 (DR_PARTIAL)
    w2_ptr,        # [C, HID] second-layer weights of the channel MLP (DR_PARTIAL)
    dlog_ptr,      # [N, C] ACC_DTYPE      out: dL/dlogits (DR_PARTIAL)
    drpart_ptr,    # [N, num_c_blocks, HID] ACC_DTYPE out: partial rows of W2^T dlogits
    C, P,
    p_per_split,  # positions per split, a multiple of BLOCK_P
    num_c_blocks, num_p_splits, PB, HID,
    AMAX: tl.constexpr,
    DR_PARTIAL: tl.constexpr,  # one split: also dlogits and the W2^T dlogits partials
    P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop (1: none)
    ROW_ALIGN: tl.constexpr,   # NCHW: H*W's known divisor (plane._plane_offsets)
    BLOCK_PB: tl.constexpr,    # B1 partial rows merged at once (DR_PARTIAL)
    BLOCK_H: tl.constexpr,     # hidden units per step of the partial (DR_PARTIAL)
    HID_LOOP: tl.constexpr,    # BLOCK_H < HID: the partial loops over hidden blocks
):
    """Gc2[c] = sum_p x[c, p] * (dsmean[p] / C + dsmax[p] * e_k[c, p])

    DR_PARTIAL (num_p_splits == 1, two-layer MLP): with Gc = Gc1 (the sum of B1's PB
    partial rows) + Gc2, for this program's channel block B:
        dlogits[c] = Gc[c] * ca[c] * (1 - ca[c]),
        drpart[n, cb, j] = sum_{c in B} W2[c, j] * dlogits[c]

    The part of dL/dca that flows through the spatial pools of y = x * ca. One program
    sums the positions of one split for a block of channels; the channel map's backward
    (channel_gate.py) adds the PS partial rows in a fixed order (no atomics).
    """
    pid = tl.program_id(0)
    cb = pid % num_c_blocks
    ps = (pid // num_c_blocks) % num_p_splits
    n = pid // (num_c_blocks * num_p_splits)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = n.to(tl.int64) * C * P
    row = n.to(tl.int64) * P
    if ROW_ALIGN > 1:  # NCHW only (plan.row_align)
        row = tl.multiple_of(row, ROW_ALIGN)
    inv_c = 1.0 / tl.cast(C, ACC_DTYPE)  # tl.cast: C may arrive as a plain int (see plane.py)
    if AMAX:
        ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC_DTYPE)
    p_start = ps * p_per_split
    p_end = tl.minimum(p_start + p_per_split, P)
    for p0 in tl.range(0, p_end - p_start, BLOCK_P, num_stages=NUM_STAGES):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_P)
        mask_p = _below(offs_p, p_end, ROW_ALIGN)
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + base + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG, ROW_ALIGN),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        # per position: the weight of x off the spatial max (lo) and at it (hi); x is 0
        # outside the tile's mask, and so is its product
        lo = tl.load(dsmean_ptr + row + offs_p, mask=mask_p, other=0.0) * inv_c
        dsx = tl.load(dsmax_ptr + row + offs_p, mask=mask_p, other=0.0)
        if AMAX:
            smax = tl.load(smax_ptr + row + offs_p, mask=mask_p, other=0.0)
            scnt = tl.load(scnt_ptr + row + offs_p, mask=mask_p, other=1).to(ACC_DTYPE)
            at_max = (x * ca[:, None]) == smax[None, :]
            hi = lo + dsx / scnt
        else:
            sidx = tl.load(sidx_ptr + row + offs_p, mask=mask_p, other=-1)
            at_max = offs_c[:, None] == sidx[None, :]
            hi = lo + dsx
        acc += x * tl.where(at_max, hi[None, :], lo[None, :])
    gc2 = tl.sum(acc, 1)
    if DR_PARTIAL:
        if not AMAX:
            ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
        gc = _sum_partial_rows(gc_part_ptr, n, PB, C, offs_c, mask_c, ACC_DTYPE, BLOCK_PB,
                               BLOCK_PB) + gc2
        dlog = tl.where(mask_c, gc * (ca * (1 - ca)), 0.0)
        tl.store(dlog_ptr + n.to(tl.int64) * C + offs_c, dlog, mask=mask_c)
        _weight_slice_products(w2_ptr, 1, HID, offs_c, mask_c, dlog, dlog, drpart_ptr,
                               (n.to(tl.int64) * num_c_blocks + cb) * HID, HID, False,
                               HID_LOOP, ACC_DTYPE, BLOCK_H, NUM_STAGES)
    else:
        out = (n.to(tl.int64) * num_p_splits + ps) * C + offs_c
        tl.store(gc2_part_ptr + out, gc2, mask=mask_c)


@triton.jit
def _bwd_maxima(idx_ptr, cnt_ptr, max_ptr, mean_grad_ptr, max_grad_ptr, row, mask, inv_len,
                shift, AMAX: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What B3 adds for one pooled row (a channel's avg/max over positions, or a position's
    mean/max over channels) at `row`: (lo, hi, idx, mx, tied).

    lo = dL/dmean / length, added to every element; hi = lo + dL/dmax / count, added
    instead at the maxima. idx - shift: the one maximum where it is untied (-1 where tied);
    mx (AMAX): the maximum where it is tied, NaN where not, so that `value == mx` finds the
    tied maxima and nothing else (also where x was not read and is 0)."""
    lo = tl.load(mean_grad_ptr + row, mask=mask, other=0.0) * inv_len
    d = tl.load(max_grad_ptr + row, mask=mask, other=0.0)
    idx = tl.load(idx_ptr + row, mask=mask, other=-1) - shift
    mx = lo
    tied = False
    if AMAX:
        cnt = tl.load(cnt_ptr + row, mask=mask, other=1)
        tied = cnt > 1
        d = d / cnt.to(ACC_DTYPE)
        idx = tl.where(tied, -1, idx)
        mx = tl.where(tied, tl.load(max_ptr + row, mask=mask, other=0.0), float("nan"))
    return lo, lo + d, idx, mx, tied


@triton.jit
def _bwd_input_tile(
    g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr, scnt_ptr, dx_ptr,
    n, C, P, p0, p_end, offs_c, mask_c, ca, c_lo, c_hi, c_idx, c_max, c_tied, inv_c,
    HAS_SA: tl.constexpr, AMAX: tl.constexpr, P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """dx of one tile: the channel block of offs_c (its gate ca and its _bwd_maxima rows,
    read by the caller) and the positions p0 .. p0 + BLOCK_P (before p_end)."""
    offs_p, mask_p, mask, plane, prow = _plane_tile(n, C, P, p0, p_end, offs_c, mask_c,
                                                    P_CONTIG, BLOCK_P, ROW_ALIGN)
    g = tl.load(g_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_SA:
        sa = tl.load(sa_ptr + prow, mask=mask_p, other=0.0)
        s_lo, s_hi, s_idx, s_max, s_tied = _bwd_maxima(sidx_ptr, scnt_ptr, smax_ptr, dsmean_ptr,
                                                       dsmax_ptr, prow, mask_p, inv_c, 0,
                                                       AMAX, ACC_DTYPE)
    if AMAX:
        need_x = c_tied[:, None]
        if HAS_SA:
            need_x = need_x | s_tied[None, :]
        # Masked-off lanes issue no memory traffic: x is read only at ties.
        x = tl.load(x_ptr + plane, mask=mask & need_x, other=0.0).to(ACC_DTYPE)
    if HAS_SA:
        at_max = offs_c[:, None] == s_idx[None, :]
        if AMAX:
            at_max = at_max | (x * ca[:, None] == s_max[None, :])
        dy = g * sa[None, :] + tl.where(at_max, s_hi[None, :], s_lo[None, :])
    else:
        dy = g
    at_max = offs_p[None, :] == c_idx[:, None]
    if AMAX:
        at_max = at_max | (x == c_max[:, None])
    dx = dy * ca[:, None] + tl.where(at_max, c_hi[:, None], c_lo[:, None])
    tl.store(dx_ptr + plane, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_input_kernel(
    g_ptr,       # [N, C x P plane], input dtype
    x_ptr,       # [N, C x P plane], input dtype (read only at tied maxima, AMAX)
    ca_ptr,      # [N, C] ACC_DTYPE
    sa_ptr,      # [N, P] ACC_DTYPE (HAS_SA)
    dsmean_ptr,  # [N, P] ACC_DTYPE (HAS_SA)
    dsmax_ptr,   # [N, P] ACC_DTYPE (HAS_SA)
    smax_ptr,    # [N, P] ACC_DTYPE (HAS_SA and AMAX)
    sidx_ptr,    # [N, P] int32     (HAS_SA)
    scnt_ptr,    # [N, P] int32     (HAS_SA and AMAX)
    davg_ptr,    # [N, C] ACC_DTYPE dL/davg
    dmx_ptr,     # [N, C] ACC_DTYPE dL/dmx
    mx_ptr,      # [N, C] ACC_DTYPE channel max of x (AMAX)
    cidx_ptr,    # [N, C] int32     first position reaching it
    ccnt_ptr,    # [N, C] int32     number of positions reaching it (AMAX)
    dx_ptr,      # [N, C x P plane], input dtype, same layout as g
    C, P, num_c_blocks, num_p_groups,
    p_per_program,  # positions of one program: BLOCK_P, or a multiple of it (LOOP)
    HAS_SA: tl.constexpr,
    AMAX: tl.constexpr,
    P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    LOOP: tl.constexpr,  # several position blocks per program, in a pipelined loop
    ROW_ALIGN: tl.constexpr,  # NCHW: H*W's known divisor (plane._plane_offsets)
):
    """dx = (g*sa + dsmean/C + dsmax*e_k) * ca + davg/P + dmx*e_j

    A program takes one channel block and p_per_program positions: the channel rows
    (ca, davg, dmx, argmax) are read once; with LOOP, the loop over its position blocks
    keeps the next tiles' loads in flight while the current one is computed."""
    pid = tl.program_id(0)
    inv_c = 1.0 / tl.cast(C, ACC_DTYPE)  # one division per program, not per element
    inv_p = 1.0 / tl.cast(P, ACC_DTYPE)
    n, cb, pg = _elementwise_program(pid, num_c_blocks, num_p_groups, P_CONTIG)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    crow = n.to(tl.int64) * C + offs_c
    ca = tl.load(ca_ptr + crow, mask=mask_c, other=0.0)
    c_lo, c_hi, c_idx, c_max, c_tied = _bwd_maxima(cidx_ptr, ccnt_ptr, mx_ptr, davg_ptr, dmx_ptr,
                                                   crow, mask_c, inv_p, 0, AMAX, ACC_DTYPE)
    p_start = pg * p_per_program
    p_end = tl.minimum(p_start + p_per_program, P)
    if LOOP:
        for p0 in tl.range(p_start, p_end, BLOCK_P, num_stages=STAGES):
            _bwd_input_tile(g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr,
                            scnt_ptr, dx_ptr, n, C, P, p0, p_end, offs_c, mask_c, ca, c_lo,
                            c_hi, c_idx, c_max, c_tied, inv_c, HAS_SA, AMAX, P_CONTIG,
                            ACC_DTYPE, BLOCK_P, ROW_ALIGN)
    else:
        _bwd_input_tile(g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr,
                        scnt_ptr, dx_ptr, n, C, P, p_start, p_end, offs_c, mask_c, ca, c_lo, c_hi,
                        c_idx, c_max, c_tied, inv_c, HAS_SA, AMAX, P_CONTIG, ACC_DTYPE, BLOCK_P,
                        ROW_ALIGN)


@triton.jit
def _bwd_input_rows_kernel(
    g_ptr,       # [N, C x P plane], input dtype
    x_ptr,       # [N, C x P plane], input dtype (read only near tied maxima, AMAX)
    ca_ptr,      # [N, C] ACC_DTYPE
    sa_ptr,      # [N, P] ACC_DTYPE (HAS_SA)
    dsmean_ptr,  # [N, P] ACC_DTYPE (HAS_SA)
    dsmax_ptr,   # [N, P] ACC_DTYPE (HAS_SA)
    smax_ptr,    # [N, P] ACC_DTYPE (HAS_SA and AMAX)
    sidx_ptr,    # [N, P] int32     (HAS_SA)
    scnt_ptr,    # [N, P] int32     (HAS_SA and AMAX)
    davg_ptr,    # [N, C] ACC_DTYPE dL/davg
    dmx_ptr,     # [N, C] ACC_DTYPE dL/dmx
    mx_ptr,      # [N, C] ACC_DTYPE channel max of x (AMAX)
    cidx_ptr,    # [N, C] int32     first position reaching it
    ccnt_ptr,    # [N, C] int32     number of positions reaching it (AMAX)
    dx_ptr,      # [N, C x P plane], input dtype, same layout as g
    C, P, num_k_blocks, num_r_groups,
    HAS_SA: tl.constexpr,
    AMAX: tl.constexpr,
    P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STEPS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # NCHW: H*W's known divisor (plane._plane_offsets)
):
    """B3 by rows: dx = (g*sa + dsmean/C + dsmax*e_k)*ca + davg/P + dmx*e_j

    The plane is walked along its contiguous axis K (positions in NCHW, channels in
    channels_last) in blocks of BLOCK_K, one 16-byte vector per thread, and across the
    other axis R in STEPS rows per program, unrolled so that every row's loads are in
    flight at once. What belongs to the block's K entries (their gate, pooled gradients and
    maxima) is read once per program; what belongs to a row is one value per step, the
    same in every lane. No tile, so no layout conversion between the two.

    A maximum adds hi instead of lo (_bwd_maxima): at its index where untied, and where
    tied (AMAX) at every element equal to it, which needs x: read for a whole row when
    the row's own maximum is tied, and in NCHW for every row when any position of the
    block has a tied spatial maximum (in channels_last per element where the channel's
    maximum is tied). Elsewhere x is not read."""
    pid = tl.program_id(0)
    inv_c = 1.0 / tl.cast(C, ACC_DTYPE)  # one division per program, not per element
    inv_p = 1.0 / tl.cast(P, ACC_DTYPE)
    kb = pid % num_k_blocks  # K blocks fastest: neighbouring programs, neighbouring memory
    rg = (pid // num_k_blocks) % num_r_groups
    n = pid // (num_k_blocks * num_r_groups)
    if P_CONTIG:
        K = P
        R = C
    else:
        K = C
        R = P
    if ROW_ALIGN > 1:  # rows start on ROW_ALIGN-element boundaries: vector access
        K = tl.multiple_of(K, ROW_ALIGN)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = _below(offs_k, K, ROW_ALIGN)
    krow = n.to(tl.int64) * K + offs_k
    r_start = rg * STEPS
    rrow = n.to(tl.int64) * R + r_start
    need_x_k = False
    if P_CONTIG:
        if HAS_SA:
            sa_k = tl.load(sa_ptr + krow, mask=mask_k, other=0.0)
            s_lo, s_hi, s_idx, s_max, s_tied = _bwd_maxima(sidx_ptr, scnt_ptr, smax_ptr,
                                                           dsmean_ptr, dsmax_ptr, krow, mask_k,
                                                           inv_c, r_start, AMAX, ACC_DTYPE)
            if AMAX:  # any tied spatial maximum in the block
                need_x_k = tl.max(s_tied.to(tl.int32), axis=0) > 0
    else:
        ca_k = tl.load(ca_ptr + krow, mask=mask_k, other=0.0)
        c_lo, c_hi, c_idx, c_max, c_tied = _bwd_maxima(cidx_ptr, ccnt_ptr, mx_ptr, davg_ptr,
                                                       dmx_ptr, krow, mask_k, inv_p, r_start,
                                                       AMAX, ACC_DTYPE)
        if AMAX:
            need_x_k = c_tied
    plane = n.to(tl.int64) * C * P + r_start.to(tl.int64) * K + offs_k
    for i in tl.static_range(STEPS):
        valid = r_start + i < R
        m = mask_k & valid
        off = plane + i * K
        row = rrow + i  # int64: this row's entry in the [N, R] rows
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC_DTYPE)
        need_x = need_x_k
        if P_CONTIG:  # row = channel r_start + i
            ca = tl.load(ca_ptr + row, mask=valid, other=0.0)
            c_lo, c_hi, c_idx, c_max, c_tied = _bwd_maxima(cidx_ptr, ccnt_ptr, mx_ptr,
                                                           davg_ptr, dmx_ptr, row, valid,
                                                           inv_p, 0, AMAX, ACC_DTYPE)
            if AMAX:
                need_x = need_x | c_tied
            c_pos = offs_k
            s_pos = i
        else:  # row = position r_start + i
            ca = ca_k
            if HAS_SA:
                sa = tl.load(sa_ptr + row, mask=valid, other=0.0)
                s_lo, s_hi, s_idx, s_max, s_tied = _bwd_maxima(sidx_ptr, scnt_ptr, smax_ptr,
                                                               dsmean_ptr, dsmax_ptr, row,
                                                               valid, inv_c, 0, AMAX,
                                                               ACC_DTYPE)
                if AMAX:
                    need_x = need_x | s_tied
            c_pos = i
            s_pos = offs_k
        if AMAX:
            x = tl.load(x_ptr + off, mask=m & need_x, other=0.0).to(ACC_DTYPE)
        if HAS_SA:
            if P_CONTIG:
                sa = sa_k
            at_max = s_idx == s_pos
            if AMAX:
                at_max = at_max | (x * ca == s_max)
            dy = g * sa + tl.where(at_max, s_hi, s_lo)
        else:
            dy = g
        at_max = c_idx == c_pos
        if AMAX:
            at_max = at_max | (x == c_max)
        dx = dy * ca + tl.where(at_max, c_hi, c_lo)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
