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
BatchNorm gradients.
"""
import triton
import triton.language as tl

from .channel_gate import _mlp_inputs, _relu


@triton.jit
def _weight_grads_kernel(
    avg_ptr, mx_ptr,   # [N, C] ACC_DTYPE pooled channel statistics (the MLP inputs)
    h_ptr, dh_ptr,     # [N, 2, HID] ACC_DTYPE hidden pre-activations and their gradients
    dlog_ptr,          # [N, C] ACC_DTYPE dL/dlogits
    cgrad_ptr,         # [N, CG] ACC_DTYPE per-sample conv gradients (weights, then bias)
    bsums_ptr,         # [N, 2] ACC_DTYPE per-sample (sum ds, sum ds*uhat)
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,        # outputs, in each parameter's dtype
    dcw_ptr, dcb_ptr, dbnw_ptr, dbnb_ptr,
    N, C, HID, CG, T1, T2, NJB1, NJB2,
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
    BLOCK_G: tl.constexpr,   # entries of the conv gradient handled at once
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
        for n in range(0, N):
            crow = tl.cast(n, tl.int64) * C
            avg = tl.load(avg_ptr + crow + offs_k, mask=mask_k, other=0.0)
            mx = tl.load(mx_ptr + crow + offs_k, mask=mask_k, other=0.0)
            v_a, v_m = _mlp_inputs(avg, mx, POOL)
            if TWO_LAYERS:
                hrow = tl.cast(n, tl.int64) * 2 * HID
                d_a = tl.load(dh_ptr + hrow + offs_r, mask=mask_r, other=0.0)
                acc += d_a[:, None] * v_a[None, :]
                bacc += d_a
                if POOL == 0:
                    d_m = tl.load(dh_ptr + hrow + HID + offs_r, mask=mask_r, other=0.0)
                    acc += d_m[:, None] * v_m[None, :]
                    bacc += d_m
            else:
                d = tl.load(dlog_ptr + crow + offs_r, mask=mask_r, other=0.0)
                acc += d[:, None] * v_a[None, :]
                bacc += d
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
        for n in range(0, N):
            d = tl.load(dlog_ptr + tl.cast(n, tl.int64) * C + offs_r, mask=mask_r, other=0.0)
            hrow = tl.cast(n, tl.int64) * 2 * HID
            r_a = _relu(tl.load(h_ptr + hrow + offs_k, mask=mask_k, other=0.0))
            acc += d[:, None] * r_a[None, :]
            bacc += d
            if POOL == 0:
                r_m = _relu(tl.load(h_ptr + hrow + HID + offs_k, mask=mask_k, other=0.0))
                acc += d[:, None] * r_m[None, :]
                bacc += d
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
                for n in range(0, N):
                    acc += tl.load(cgrad_ptr + n * CG + offs_g, mask=mask_g, other=0.0)
                tl.store(dcw_ptr + offs_g, acc.to(dcw_ptr.dtype.element_ty), mask=offs_g < CG - 1)
                if HAS_CONV_BIAS:
                    tl.store(dcb_ptr + offs_g - (CG - 1), acc.to(dcb_ptr.dtype.element_ty),
                             mask=offs_g == CG - 1)
        if HAS_BN_W or HAS_BN_B:
            offs_s = tl.arange(0, 2)
            acc2 = tl.zeros([2], ACC_DTYPE)
            for n in range(0, N):
                acc2 += tl.load(bsums_ptr + n * 2 + offs_s)
            if HAS_BN_B:
                tl.store(dbnb_ptr + offs_s, acc2.to(dbnb_ptr.dtype.element_ty), mask=offs_s == 0)
            if HAS_BN_W:
                tl.store(dbnw_ptr + offs_s - 1, acc2.to(dbnw_ptr.dtype.element_ty), mask=offs_s == 1)
