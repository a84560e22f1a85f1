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
1/count on every tied maximum (torch.amax semantics). B3 reads x only at
positions whose max is tied; elsewhere the stored argmax decides.
"""
import triton
import triton.language as tl

from .channel_gate import _weight_slice_products
from .plane import (STAGES, _elementwise_program, _plane_offsets, _plane_tile,
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
    mask_p = offs_p < P
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
        plane = base + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG)
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
    inv_c = 1.0 / tl.cast(C, ACC_DTYPE)  # tl.cast: C may arrive as a plain int (see plane.py)
    if AMAX:
        ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC_DTYPE)
    p_start = ps * p_per_split
    p_end = tl.minimum(p_start + p_per_split, P)
    for p0 in tl.range(0, p_end - p_start, BLOCK_P, num_stages=NUM_STAGES):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + base + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG),
                    mask=mask, other=0.0).to(ACC_DTYPE)
        dsm = tl.load(dsmean_ptr + row + offs_p, mask=mask_p, other=0.0)
        dsx = tl.load(dsmax_ptr + row + offs_p, mask=mask_p, other=0.0)
        if AMAX:
            smax = tl.load(smax_ptr + row + offs_p, mask=mask_p, other=0.0)
            scnt = tl.load(scnt_ptr + row + offs_p, mask=mask_p, other=1).to(ACC_DTYPE)
            hit = (x * ca[:, None]) == smax[None, :]
            ek = tl.where(hit, 1.0 / scnt[None, :], 0.0)
        else:
            sidx = tl.load(sidx_ptr + row + offs_p, mask=mask_p, other=-1)
            ek = tl.where(offs_c[:, None] == sidx[None, :], 1.0, 0.0)
        acc += tl.where(mask, x * (dsm[None, :] * inv_c + dsx[None, :] * ek), 0.0)
    gc2 = tl.sum(acc, 1)
    if DR_PARTIAL:
        if not AMAX:
            ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
        gc = _sum_partial_rows(gc_part_ptr, n, PB, C, offs_c, mask_c, ACC_DTYPE, BLOCK_PB) + gc2
        dlog = tl.where(mask_c, gc * (ca * (1 - ca)), 0.0)
        tl.store(dlog_ptr + n.to(tl.int64) * C + offs_c, dlog, mask=mask_c)
        _weight_slice_products(w2_ptr, 1, HID, offs_c, mask_c, dlog, dlog, drpart_ptr,
                               (n.to(tl.int64) * num_c_blocks + cb) * HID, HID, False,
                               HID_LOOP, ACC_DTYPE, BLOCK_H, NUM_STAGES)
    else:
        out = (n.to(tl.int64) * num_p_splits + ps) * C + offs_c
        tl.store(gc2_part_ptr + out, gc2, mask=mask_c)


@triton.jit
def _bwd_input_tile(
    g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr, scnt_ptr, dx_ptr,
    n, C, P, p0, p_end, offs_c, mask_c, ca, davg, dmx, mx, cidx, ccnt, inv_c, inv_p,
    HAS_SA: tl.constexpr, AMAX: tl.constexpr, P_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx of one tile: the channel block of offs_c (rows ca ... ccnt, read by the caller)
    and the positions p0 .. p0 + BLOCK_P (before p_end)."""
    offs_p, mask_p, mask, plane, prow = _plane_tile(n, C, P, p0, p_end, offs_c, mask_c,
                                                    P_CONTIG, BLOCK_P)
    g = tl.load(g_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
    if AMAX:
        need_x = ccnt[:, None] > 1
        if HAS_SA:
            scnt = tl.load(scnt_ptr + prow, mask=mask_p, other=1)
            need_x = need_x | (scnt[None, :] > 1)
        # Masked-off lanes issue no memory traffic: x is read only at ties.
        x = tl.load(x_ptr + plane, mask=mask & need_x, other=0.0).to(ACC_DTYPE)
    if HAS_SA:
        sa = tl.load(sa_ptr + prow, mask=mask_p, other=0.0)
        dsm = tl.load(dsmean_ptr + prow, mask=mask_p, other=0.0)
        dsx = tl.load(dsmax_ptr + prow, mask=mask_p, other=0.0)
        sidx = tl.load(sidx_ptr + prow, mask=mask_p, other=-1)
        ek = tl.where(offs_c[:, None] == sidx[None, :], 1.0, 0.0)
        if AMAX:
            smax = tl.load(smax_ptr + prow, mask=mask_p, other=0.0)
            tied = scnt[None, :] > 1
            hit = (x * ca[:, None]) == smax[None, :]
            ek = tl.where(tied, tl.where(hit, 1.0 / scnt.to(ACC_DTYPE)[None, :], 0.0), ek)
        dy = g * sa[None, :] + (dsm * inv_c)[None, :] + dsx[None, :] * ek
    else:
        dy = g
    ej = tl.where(offs_p[None, :] == cidx[:, None], 1.0, 0.0)
    if AMAX:
        tied_c = ccnt[:, None] > 1
        ej = tl.where(tied_c, tl.where(x == mx[:, None], 1.0 / ccnt.to(ACC_DTYPE)[:, None], 0.0),
                      ej)
    dx = dy * ca[:, None] + (davg * inv_p)[:, None] + dmx[:, None] * ej
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
    davg = tl.load(davg_ptr + crow, mask=mask_c, other=0.0)
    dmx = tl.load(dmx_ptr + crow, mask=mask_c, other=0.0)
    cidx = tl.load(cidx_ptr + crow, mask=mask_c, other=-1)
    ccnt = cidx
    mx = ca
    if AMAX:
        ccnt = tl.load(ccnt_ptr + crow, mask=mask_c, other=1)
        mx = tl.load(mx_ptr + crow, mask=mask_c, other=0.0)
    p_start = pg * p_per_program
    p_end = tl.minimum(p_start + p_per_program, P)
    if LOOP:
        for p0 in tl.range(p_start, p_end, BLOCK_P, num_stages=STAGES):
            _bwd_input_tile(g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr,
                            scnt_ptr, dx_ptr, n, C, P, p0, p_end, offs_c, mask_c, ca, davg, dmx,
                            mx, cidx, ccnt, inv_c, inv_p, HAS_SA, AMAX, P_CONTIG, ACC_DTYPE,
                            BLOCK_P)
    else:
        _bwd_input_tile(g_ptr, x_ptr, sa_ptr, dsmean_ptr, dsmax_ptr, smax_ptr, sidx_ptr,
                        scnt_ptr, dx_ptr, n, C, P, p_start, p_end, offs_c, mask_c, ca, davg, dmx,
                        mx, cidx, ccnt, inv_c, inv_p, HAS_SA, AMAX, P_CONTIG, ACC_DTYPE, BLOCK_P)
