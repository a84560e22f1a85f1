"""Parameter gradients of the small maps: the sums over samples, in one launch.

Every gradient here is a sum over the N samples of per-sample rows written by the
backward kernels, formed in a fixed order (deterministic, no atomics) and stored in the
parameter's own dtype and layout:

    TWO_LAYERS:  dW1[j, c] = sum_n sum_b dh_b[n, j] v_b[n, c]     db1[j] = sum_n sum_b dh_b[n, j]
                 dW2[c, j] = sum_n sum_b dlog[n, c] relu(h_b[n, j])  db2[c] = sum_n sum_b dlog[n, c]
    one layer:   dW1[o, k] = sum_n dlog[n, o] v_a[n, k]           db1[o] = sum_n dlog[n, o]
    conv:        dw, db = sum_n of the per-sample rows of spatial_gate.py
    BatchNorm:   dgamma = sum_n sum(ds * uhat), dbeta = sum_n sum(ds)  (this process's
                 samples only, as nn.SyncBatchNorm's parameter gradients)

b runs over the MLP branches (avg and max for POOL 0, one branch otherwise). Programs
[0, T1) own tiles of dW1, [T1, T1 + T2) tiles of dW2, and the last one the conv and
BatchNorm gradients. Each program reads BLOCK_N samples' rows per step, so a step is one
memory round trip for all of them (a loop over single samples waits on N trips in series),
and the loop over steps is software-pipelined (the next steps' rows in flight).
"""
import triton
import triton.language as tl

from .channel_gate import _mlp_inputs, _relu
from .plane import STAGES


@triton.jit
def _sample_rows(ptr, n0, N, stride, offs, mask, BLOCK_N: tl.constexpr):
    """[BLOCK_N, len(offs)] rows n0 .. n0 + BLOCK_N of a [N, stride] array at columns offs
    (zero outside)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m = (offs_n < N)[:, None] & mask[None, :]
    return tl.load(ptr + offs_n[:, None].to(tl.int64) * stride + offs[None, :], mask=m, other=0.0)


@triton.jit
def _outer_sum(d, v):
    """sum_n d[n, :, None] * v[n, None, :] -> [R, K]: one chunk of samples of a weight
    gradient tile, summed in the compiled reduction's fixed order."""
    return tl.sum(d[:, :, None] * v[:, None, :], 0)


@triton.jit
def _weight_grads_kernel(
    avg_ptr, mx_ptr,   # [N, C] ACC_DTYPE pooled channel statistics (the MLP inputs)
    h_ptr, dh_ptr,     # [N, 2, HID] ACC_DTYPE hidden pre-activations and their gradients
    dlog_ptr,          # [N, C] ACC_DTYPE dL/dlogits
    cgrad_ptr,         # [NR, CG] ACC_DTYPE conv gradient rows (weights, then bias)
    bsums_ptr,         # [NR, 2] ACC_DTYPE BatchNorm-backward rows (sum ds, sum ds*uhat)
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,        # outputs, in each parameter's dtype
    dcw_ptr, dcb_ptr, dbnw_ptr, dbnb_ptr,
    N, C, HID, CG, NR, T1, T2, NJB1, NJB2,
    POOL: tl.constexpr,
    TWO_LAYERS: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_CONV: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_BN_W: tl.constexpr,
    HAS_BN_B: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,   # rows of a weight tile
    BLOCK_K: tl.constexpr,   # columns of a weight tile
    BLOCK_N: tl.constexpr,   # samples summed per step (one round trip for all of them)
    BLOCK_G: tl.constexpr,   # entries of the conv gradient handled at once
    BLOCK_NR: tl.constexpr,  # conv / BatchNorm rows summed per step
):
    pid = tl.program_id(0)
    if pid < T1:
        # dW1 tile: rows j (hidden units, or outputs of the one layer), columns c
        if TWO_LAYERS:
            J1 = HID
        else:
            J1 = C
        rb = pid % NJB1
        kb = pid // NJB1
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_r = offs_r < J1
        mask_k = offs_k < C
        acc = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
        bacc = tl.zeros([BLOCK_R], ACC_DTYPE)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=STAGES):
            avg = _sample_rows(avg_ptr, n0, N, C, offs_k, mask_k, BLOCK_N)
            mx = _sample_rows(mx_ptr, n0, N, C, offs_k, mask_k, BLOCK_N)
            v_a, v_m = _mlp_inputs(avg, mx, POOL)
            if TWO_LAYERS:
                d_a = _sample_rows(dh_ptr, n0, N, 2 * HID, offs_r, mask_r, BLOCK_N)
                acc += _outer_sum(d_a, v_a)
                bacc += tl.sum(d_a, 0)
                if POOL == 0:
                    d_m = _sample_rows(dh_ptr + HID, n0, N, 2 * HID, offs_r, mask_r, BLOCK_N)
                    acc += _outer_sum(d_m, v_m)
                    bacc += tl.sum(d_m, 0)
            else:
                d = _sample_rows(dlog_ptr, n0, N, C, offs_r, mask_r, BLOCK_N)
                acc += _outer_sum(d, v_a)
                bacc += tl.sum(d, 0)
        tl.store(dw1_ptr + offs_r[:, None].to(tl.int64) * C + offs_k[None, :],
                 acc.to(dw1_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])
        if HAS_B1:
            if kb == 0:
                tl.store(db1_ptr + offs_r, bacc.to(db1_ptr.dtype.element_ty), mask=mask_r)
    elif pid < T1 + T2:
        # dW2 tile: rows c, columns j (hidden units)
        q = pid - T1
        rb = q % NJB2
        kb = q // NJB2
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_r = offs_r < C
        mask_k = offs_k < HID
        acc = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
        bacc = tl.zeros([BLOCK_R], ACC_DTYPE)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=STAGES):
            d = _sample_rows(dlog_ptr, n0, N, C, offs_r, mask_r, BLOCK_N)
            r = _relu(_sample_rows(h_ptr, n0, N, 2 * HID, offs_k, mask_k, BLOCK_N))
            if POOL == 0:
                # both branches share dlogits: d r_a + d r_m = d (r_a + r_m), one product
                r += _relu(_sample_rows(h_ptr + HID, n0, N, 2 * HID, offs_k, mask_k, BLOCK_N))
            acc += _outer_sum(d, r)
            bacc += tl.sum(d, 0)
            if POOL == 0:
                bacc += tl.sum(d, 0)
        tl.store(dw2_ptr + offs_r[:, None].to(tl.int64) * HID + offs_k[None, :],
                 acc.to(dw2_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])
        if HAS_B2:
            if kb == 0:
                tl.store(db2_ptr + offs_r, bacc.to(db2_ptr.dtype.element_ty), mask=mask_r)
    else:
        if HAS_CONV:
            for g0 in range(0, CG, BLOCK_G):
                offs_g = g0 + tl.arange(0, BLOCK_G)
                mask_g = offs_g < CG
                acc = tl.zeros([BLOCK_G], ACC_DTYPE)
                for n0 in range(0, NR, BLOCK_NR):
                    acc += tl.sum(_sample_rows(cgrad_ptr, n0, NR, CG, offs_g, mask_g, BLOCK_NR), 0)
                tl.store(dcw_ptr + offs_g, acc.to(dcw_ptr.dtype.element_ty), mask=offs_g < CG - 1)
                if HAS_CONV_BIAS:
                    tl.store(dcb_ptr + offs_g - (CG - 1), acc.to(dcb_ptr.dtype.element_ty),
                             mask=offs_g == CG - 1)
        if HAS_BN_W or HAS_BN_B:
            offs_s = tl.arange(0, 2)
            acc2 = tl.zeros([2], ACC_DTYPE)
            for n0 in range(0, NR, BLOCK_NR):
                acc2 += tl.sum(_sample_rows(bsums_ptr, n0, NR, 2, offs_s, offs_s < 2, BLOCK_NR), 0)
            if HAS_BN_B:
                tl.store(dbnb_ptr + offs_s, acc2.to(dbnb_ptr.dtype.element_ty), mask=offs_s == 0)
            if HAS_BN_W:
                tl.store(dbnw_ptr + offs_s - 1, acc2.to(dbnw_ptr.dtype.element_ty), mask=offs_s == 1)
