"""The channel map phi, forward and backward (docs/design.md section 8).

The general kernels run one program per sample. After an unsplit F1 (one split) the
forward's first layer is already summed per channel block by F1 itself, and
_channel_gate_fwd_blocks_kernel runs parallel over (sample, channel range); after an
unsplit B2, B2 has formed dlogits and the per-block partials of W2^T dlogits, and
_channel_gate_bwd_blocks_kernel runs parallel the same way (_weight_slice_products).

Per sample n, with the pooled channel statistics avg[c], mx[c] of x:

    v_a, v_m  = the MLP inputs:  POOL 0 (avg+max): v_a = avg, v_m = mx   (two branches)
                                 POOL 1 (mean(avg,max)): v_a = 0.5*avg + 0.5*mx
                                 POOL 2 (avg): v_a = avg
    TWO_LAYERS:  h_b = W1 v_b + b1,  o = sum_b (W2 relu(h_b) + b2)     W1 [HID, C], W2 [C, HID]
    one layer:   o = W1 v_a + b1                                        W1 [C, C] (ultralytics)
    ca = sigmoid(o)

Backward, from Gc = dL/dca (the sums of B1's and B2's partial rows):
    dlogits = Gc * ca * (1 - ca)
    TWO_LAYERS:  dh_b = (W2^T dlogits) * [h_b > 0],   dv_b = W1^T dh_b
    one layer:   dv_a = W1^T dlogits
    davg, dmx from dv (POOL 0: dv_a, dv_m; POOL 1: 0.5*dv_a twice; POOL 2: dv_a, 0)

The weight gradients need sums over samples and are formed in weight_grads.py from the
rows stored here (dlogits, dh). Weights are read in their own dtype and used in
ACC_DTYPE. The combine of F1's split partials happens here too, so a split F1 costs no
extra launch.
"""
import triton
import triton.language as tl

from .plane import MERGE_ROWS_PER_STEP, STAGES, _combined_stats, _sum_partial_rows


@triton.jit
def _mlp_inputs(avg, mx, POOL: tl.constexpr):
    if POOL == 0:
        return avg, mx
    elif POOL == 1:
        return 0.5 * avg + 0.5 * mx, mx
    else:
        return avg, mx


@triton.jit
def _relu(h):
    """relu with torch's NaN behaviour: NaN stays NaN."""
    return tl.where(h <= 0, 0.0, h)


@triton.jit
def _slice_tile(w_ptr, stride_h, stride_c, offs_c, mask_c, v_a, v_m, out_ptr, out_row, h0, HID,
                TWO: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Hidden units h0 .. h0 + BLOCK_H of _weight_slice_products."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    # [channels, hidden]: the channel rows v_a, v_m broadcast along the axis they came on
    w = tl.load(w_ptr + offs_c[:, None].to(tl.int64) * stride_c
                + offs_h[None, :].to(tl.int64) * stride_h,
                mask=mask_c[:, None] & mask_h[None, :], other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + (out_row + offs_h), tl.sum(w * v_a[:, None], 0), mask=mask_h)
    if TWO:  # (offsets summed in int64 first: out_ptr may point into a large buffer)
        tl.store(out_ptr + (out_row + HID + offs_h), tl.sum(w * v_m[:, None], 0), mask=mask_h)


@triton.jit
def _weight_slice_products(w_ptr, stride_h, stride_c, offs_c, mask_c, v_a, v_m, out_ptr, out_row,
                           HID, TWO: tl.constexpr, HID_LOOP: tl.constexpr,
                           ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
                           NUM_STAGES: tl.constexpr):
    """The channel block offs_c's share of a product with an MLP weight, for every hidden
    unit j (W[j, c] at w_ptr + j * stride_h + c * stride_c; v_a, v_m zero off mask_c):

        out[out_row + j] = sum_{c in block} W[j, c] v_a[c]
        out[out_row + HID + j] = sum_{c in block} W[j, c] v_m[c]          (TWO)

    BLOCK_H hidden units at a time: a loop when HID_LOOP, else one tile (BLOCK_H >= HID).
    The big passes next to the channel map call it once their per-channel rows are final
    (F1: W1 v, B2: W2^T dlogits), so that the channel map needs no walk over the weight."""
    if HID_LOOP:
        for h0 in tl.range(0, HID, BLOCK_H, num_stages=NUM_STAGES):
            _slice_tile(w_ptr, stride_h, stride_c, offs_c, mask_c, v_a, v_m, out_ptr, out_row,
                        h0, HID, TWO, ACC_DTYPE, BLOCK_H)
    else:
        _slice_tile(w_ptr, stride_h, stride_c, offs_c, mask_c, v_a, v_m, out_ptr, out_row, 0,
                    HID, TWO, ACC_DTYPE, BLOCK_H)


@triton.jit
def _sum_hidden_rows(part_ptr, base, num_rows, row_stride, second, offs_h, mask_h,
                     TWO: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_RB: tl.constexpr):
    """(a, m): the sums of num_rows partial rows of hidden units, BLOCK_RB rows at a time in
    a fixed order (row r's unit j at part_ptr + base + r * row_stride + j; m from the rows
    `second` elements further, when TWO, else zero)."""
    acc_a = tl.zeros([BLOCK_H], ACC_DTYPE)
    acc_m = tl.zeros([BLOCK_H], ACC_DTYPE)
    for r0 in tl.range(0, num_rows, BLOCK_RB, num_stages=STAGES):
        offs_rb = r0 + tl.arange(0, BLOCK_RB)
        mask = (offs_rb < num_rows)[:, None] & mask_h[None, :]
        offs = base + offs_rb[:, None].to(tl.int64) * row_stride + offs_h[None, :]
        acc_a += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), 0)
        if TWO:
            acc_m += tl.sum(tl.load(part_ptr + (offs + second), mask=mask, other=0.0), 0)
    return acc_a, acc_m


@triton.jit
def _hidden_grads(h_ptr, hrow, dr, offs_h, mask_h, HID, POOL: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr):
    """(dh_a, dh_m) = dr * [h_b > 0] through the relu of each branch (NaN passes), from the
    pre-activation rows at h_ptr + hrow; dh_m is zero unless POOL 0 (one branch)."""
    h_a = tl.load(h_ptr + hrow + offs_h, mask=mask_h, other=0.0)
    dh_a = tl.where(mask_h, tl.where(h_a <= 0, 0.0, dr), 0.0)
    if POOL == 0:
        h_m = tl.load(h_ptr + hrow + HID + offs_h, mask=mask_h, other=0.0)
        dh_m = tl.where(mask_h, tl.where(h_m <= 0, 0.0, dr), 0.0)
    else:
        dh_m = tl.zeros([BLOCK_H], ACC_DTYPE)
    return dh_a, dh_m


@triton.jit
def _pool_input_grads(w1_ptr, davg_ptr, dmx_ptr, row, C, c_start, c_end, offs_h, mask_h, dh_a,
                      dh_m, POOL: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """davg, dmx of channels c_start .. c_end from dv_b = W1^T dh_b (see the module
    docstring for how each pool mode splits dv between them)."""
    for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :],
                     mask=mask_h[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
        dv_a = tl.sum(w1 * dh_a[:, None], 0)
        if POOL == 0:
            tl.store(davg_ptr + row + offs_c, dv_a, mask=mask_c)
            tl.store(dmx_ptr + row + offs_c, tl.sum(w1 * dh_m[:, None], 0), mask=mask_c)
        elif POOL == 1:
            half = 0.5 * dv_a
            tl.store(davg_ptr + row + offs_c, half, mask=mask_c)
            tl.store(dmx_ptr + row + offs_c, half, mask=mask_c)
        else:
            tl.store(davg_ptr + row + offs_c, dv_a, mask=mask_c)
            tl.store(dmx_ptr + row + offs_c, tl.zeros([BLOCK_C], ACC_DTYPE), mask=mask_c)


@triton.jit
def _channel_gate_fwd_kernel(
    psum_ptr, pmax_ptr,   # [N, S, C] ACC_DTYPE   F1 partials over S splits of H*W
    pidx_ptr, pcnt_ptr,   # [N, S, C] int32
    w1_ptr,               # [HID, C] (TWO_LAYERS) or [C, C], any float dtype
    b1_ptr,               # [HID] or [C] (HAS_B1)
    w2_ptr,               # [C, HID] (TWO_LAYERS)
    b2_ptr,               # [C] (TWO_LAYERS and HAS_B2)
    avg_ptr, mx_ptr,      # [N, C] ACC_DTYPE  out: channel mean and max of x
    idx_ptr, cnt_ptr,     # [N, C] int32      out: first argmax over H*W, tie count
    h_ptr,                # [N, 2, HID] ACC_DTYPE out: pre-activation hidden rows (TWO_LAYERS)
    ca_ptr,               # [N, C] ACC_DTYPE  out: channel gate
    C, P, HID, S,
    POOL: tl.constexpr,
    TWO_LAYERS: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,   # >= HID (TWO_LAYERS); the output block of one layer otherwise
    BLOCK_S: tl.constexpr,   # >= S
):
    """Combine F1's partials, then ca = sigmoid(phi(avg, mx)); see the module docstring."""
    n = tl.program_id(0)
    row = n.to(tl.int64) * C
    pbase = n.to(tl.int64) * S * C
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    acc_a = tl.zeros([BLOCK_H], ACC_DTYPE)
    acc_m = tl.zeros([BLOCK_H], ACC_DTYPE)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        total, m, idx, cnt = _combined_stats(psum_ptr, pmax_ptr, pidx_ptr, pcnt_ptr, pbase, C, S,
                                             offs_c, mask_c, BLOCK_S)
        avg = total / tl.cast(P, ACC_DTYPE)
        tl.store(avg_ptr + row + offs_c, avg, mask=mask_c)
        tl.store(mx_ptr + row + offs_c, m, mask=mask_c)
        tl.store(idx_ptr + row + offs_c, idx, mask=mask_c)
        tl.store(cnt_ptr + row + offs_c, cnt, mask=mask_c)
        if TWO_LAYERS:
            v_a, v_m = _mlp_inputs(avg, m, POOL)
            v_a = tl.where(mask_c, v_a, 0.0)
            v_m = tl.where(mask_c, v_m, 0.0)
            wmask = mask_h[:, None] & mask_c[None, :]
            w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=wmask,
                         other=0.0).to(ACC_DTYPE)
            acc_a += tl.sum(w1 * v_a[None, :], 1)
            if POOL == 0:
                acc_m += tl.sum(w1 * v_m[None, :], 1)
    if TWO_LAYERS:
        if HAS_B1:
            b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)
            acc_a += b1
            acc_m += b1
        hrow = n.to(tl.int64) * 2 * HID
        tl.store(h_ptr + hrow + offs_h, acc_a, mask=mask_h)
        tl.store(h_ptr + hrow + HID + offs_h, acc_m, mask=mask_h)  # defined; read for POOL 0 only
        r_a = tl.where(mask_h, _relu(acc_a), 0.0)
        r_m = tl.where(mask_h, _relu(acc_m), 0.0)
        for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            wmask = mask_h[:, None] & mask_c[None, :]
            w2 = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None], mask=wmask,
                         other=0.0).to(ACC_DTYPE)
            o = tl.sum(w2 * r_a[:, None], 0)
            if HAS_B2:
                b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
                o += b2
            if POOL == 0:
                o2 = tl.sum(w2 * r_m[:, None], 0)
                if HAS_B2:
                    o2 += b2
                o = o + o2
            tl.store(ca_ptr + row + offs_c, tl.sigmoid(o), mask=mask_c)
    else:
        # one layer C -> C: every output needs every avg[k], stored above by other threads
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_H):
            offs_o = c0 + offs_h
            mask_o = offs_o < C
            o = tl.zeros([BLOCK_H], ACC_DTYPE)
            for k0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
                offs_k = k0 + tl.arange(0, BLOCK_C)
                mask_k = offs_k < C
                v = tl.load(avg_ptr + row + offs_k, mask=mask_k, other=0.0)
                w = tl.load(w1_ptr + offs_o[:, None].to(tl.int64) * C + offs_k[None, :],
                            mask=mask_o[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
                o += tl.sum(w * v[None, :], 1)
            if HAS_B1:
                o += tl.load(b1_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)
            tl.store(ca_ptr + row + offs_o, tl.sigmoid(o), mask=mask_o)


@triton.jit
def _channel_gate_fwd_blocks_kernel(
    psum_ptr, pmax_ptr,   # [N, 1, C] ACC_DTYPE   F1's statistics (one split)
    pidx_ptr, pcnt_ptr,   # [N, 1, C] int32
    hpart_ptr,            # [N, RB, 2, HID] ACC_DTYPE F1's partial layer-1 rows, one per
                          # channel block of F1 (pool_stats.py, HID_PARTIAL)
    b1_ptr,               # [HID] (HAS_B1)
    w2_ptr,               # [C, HID], any float dtype
    b2_ptr,               # [C] (HAS_B2)
    avg_ptr, mx_ptr,      # [N, C] ACC_DTYPE  out: channel mean and max of x
    idx_ptr, cnt_ptr,     # [N, C] int32      out: first argmax over H*W, tie count
    h_ptr,                # [N, 2, HID] ACC_DTYPE out: pre-activation hidden rows
    ca_ptr,               # [N, C] ACC_DTYPE  out: channel gate
    C, P, HID, RB,
    c_per_program,        # channels per program
    num_c_programs,       # programs per sample
    POOL: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,    # >= HID
    BLOCK_RB: tl.constexpr,   # partial rows added at once
):
    """The two-layer channel map after an unsplit F1, parallel over (sample, channel range):

        h_b = sum_rb hpart[n, rb, b] + b1          (every program; fixed order over rb)
        ca[c] = sigmoid(W2[c] sum_b relu(h_b) + #branches * b2[c])   for c in this
                program's range

    Each program also copies F1's statistics of its channels to the saved avg, max, argmax
    and count; the first program of a sample stores h. Each weight row of W2 is read by
    one program per sample, and no program walks all of W1 (F1 did, a block each).
    """
    pid = tl.program_id(0)
    cp = pid % num_c_programs
    n = pid // num_c_programs
    row = n.to(tl.int64) * C
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    acc_a, acc_m = _sum_hidden_rows(hpart_ptr, n.to(tl.int64) * RB * 2 * HID, RB, 2 * HID,
                                    HID, offs_h, mask_h, POOL == 0, ACC_DTYPE, BLOCK_H,
                                    BLOCK_RB)
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)
        acc_a += b1
        acc_m += b1
    if cp == 0:
        hrow = n.to(tl.int64) * 2 * HID
        tl.store(h_ptr + hrow + offs_h, acc_a, mask=mask_h)
        tl.store(h_ptr + hrow + HID + offs_h, acc_m, mask=mask_h)  # read for POOL 0 only
    # both branches share W2: W2 relu(h_a) + W2 relu(h_m) = W2 (relu(h_a) + relu(h_m))
    r = tl.where(mask_h, _relu(acc_a), 0.0)
    if POOL == 0:
        r += tl.where(mask_h, _relu(acc_m), 0.0)
    c_start = cp * c_per_program
    c_end = tl.minimum(c_start + c_per_program, C)
    for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        total = tl.load(psum_ptr + row + offs_c, mask=mask_c, other=0.0)
        tl.store(avg_ptr + row + offs_c, total / tl.cast(P, ACC_DTYPE), mask=mask_c)
        tl.store(mx_ptr + row + offs_c, tl.load(pmax_ptr + row + offs_c, mask=mask_c),
                 mask=mask_c)
        tl.store(idx_ptr + row + offs_c, tl.load(pidx_ptr + row + offs_c, mask=mask_c),
                 mask=mask_c)
        tl.store(cnt_ptr + row + offs_c, tl.load(pcnt_ptr + row + offs_c, mask=mask_c),
                 mask=mask_c)
        w2 = tl.load(w2_ptr + offs_c[:, None].to(tl.int64) * HID + offs_h[None, :],
                     mask=mask_c[:, None] & mask_h[None, :], other=0.0).to(ACC_DTYPE)
        o = tl.sum(w2 * r[None, :], 1)
        if HAS_B2:
            b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
            o += 2 * b2 if POOL == 0 else b2
        tl.store(ca_ptr + row + offs_c, tl.sigmoid(o), mask=mask_c)


@triton.jit
def _channel_gate_bwd_blocks_kernel(
    drpart_ptr,    # [N, CB, HID] ACC_DTYPE  B2's partial rows of W2^T dlogits, one per
                   # channel block of B2 (backward.py, DR_PARTIAL)
    h_ptr,         # [N, 2, HID] ACC_DTYPE
    w1_ptr,        # [HID, C], any float dtype
    dh_ptr,        # [N, 2, HID] ACC_DTYPE out: dL/dh
    davg_ptr,      # [N, C] ACC_DTYPE out
    dmx_ptr,       # [N, C] ACC_DTYPE out
    C, HID, CB,
    c_per_program,   # channels per program
    num_c_programs,  # programs per sample
    POOL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,    # >= HID
    BLOCK_RB: tl.constexpr,   # partial rows added at once
):
    """The two-layer channel map's backward after B2 formed dlogits and the partial rows
    of W2^T dlogits, parallel over (sample, channel range):

        dr = sum_cb drpart[n, cb]   (every program; fixed order),  dh_b = dr * [h_b > 0]
        dv_b[c] = sum_j W1[j, c] dh_b[j]   for c in this program's range -> davg, dmx

    The first program of a sample stores dh (the weight gradients read it).
    """
    pid = tl.program_id(0)
    n = pid // num_c_programs
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    dr, _ = _sum_hidden_rows(drpart_ptr, n.to(tl.int64) * CB * HID, CB, HID, 0, offs_h, mask_h,
                             False, ACC_DTYPE, BLOCK_H, BLOCK_RB)
    row = n.to(tl.int64) * C
    cp = pid % num_c_programs
    hrow = n.to(tl.int64) * 2 * HID
    dh_a, dh_m = _hidden_grads(h_ptr, hrow, dr, offs_h, mask_h, HID, POOL, ACC_DTYPE, BLOCK_H)
    if cp == 0:
        tl.store(dh_ptr + hrow + offs_h, dh_a, mask=mask_h)
        tl.store(dh_ptr + hrow + HID + offs_h, dh_m, mask=mask_h)
    c_start = cp * c_per_program
    _pool_input_grads(w1_ptr, davg_ptr, dmx_ptr, row, C, c_start,
                      tl.minimum(c_start + c_per_program, C), offs_h, mask_h, dh_a, dh_m,
                      POOL, ACC_DTYPE, BLOCK_C)


@triton.jit
def _channel_gate_bwd_kernel(
    gc_part_ptr,   # [N, PB, C] ACC_DTYPE  B1's partial rows of Gc1 over PB position blocks
    gc2_part_ptr,  # [N, PS2, C] ACC_DTYPE B2's partial rows of Gc2 over PS2 position splits
                   # (HAS_GC2)
    ca_ptr,        # [N, C] ACC_DTYPE
    h_ptr,         # [N, 2, HID] ACC_DTYPE (TWO_LAYERS)
    w1_ptr,        # [HID, C] or [C, C]
    w2_ptr,        # [C, HID] (TWO_LAYERS)
    dlog_ptr,      # [N, C] ACC_DTYPE out: dL/dlogits
    dh_ptr,        # [N, 2, HID] ACC_DTYPE out: dL/dh (TWO_LAYERS)
    davg_ptr,      # [N, C] ACC_DTYPE out
    dmx_ptr,       # [N, C] ACC_DTYPE out
    C, HID, PB, PS2,
    POOL: tl.constexpr,
    TWO_LAYERS: tl.constexpr,
    HAS_GC2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_PB: tl.constexpr,    # B1 partial rows merged at once
    BLOCK_PS2: tl.constexpr,   # B2 partial rows merged at once
):
    """dlogits, dh, davg, dmx of one sample; see the module docstring."""
    n = tl.program_id(0)
    row = n.to(tl.int64) * C
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    dr = tl.zeros([BLOCK_H], ACC_DTYPE)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        gc = _sum_partial_rows(gc_part_ptr, n, PB, C, offs_c, mask_c, ACC_DTYPE, BLOCK_PB,
                               MERGE_ROWS_PER_STEP)
        if HAS_GC2:
            gc = gc + _sum_partial_rows(gc2_part_ptr, n, PS2, C, offs_c, mask_c, ACC_DTYPE,
                                        BLOCK_PS2, MERGE_ROWS_PER_STEP)
        ca = tl.load(ca_ptr + row + offs_c, mask=mask_c, other=0.0)
        dlog = gc * (ca * (1 - ca))
        tl.store(dlog_ptr + row + offs_c, dlog, mask=mask_c)
        if TWO_LAYERS:
            w2 = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None],
                         mask=mask_h[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
            dr += tl.sum(w2 * tl.where(mask_c, dlog, 0.0)[None, :], 1)
    if TWO_LAYERS:
        hrow = n.to(tl.int64) * 2 * HID
        dh_a, dh_m = _hidden_grads(h_ptr, hrow, dr, offs_h, mask_h, HID, POOL, ACC_DTYPE,
                                   BLOCK_H)
        tl.store(dh_ptr + hrow + offs_h, dh_a, mask=mask_h)
        tl.store(dh_ptr + hrow + HID + offs_h, dh_m, mask=mask_h)
        _pool_input_grads(w1_ptr, davg_ptr, dmx_ptr, row, C, 0, C, offs_h, mask_h, dh_a, dh_m,
                          POOL, ACC_DTYPE, BLOCK_C)
    else:
        # one layer: davg[k] = sum_c W1[c, k] dlogits[c], with dlogits stored above
        tl.debug_barrier()
        for k0 in range(0, C, BLOCK_H):
            offs_k = k0 + offs_h
            mask_k = offs_k < C
            dv = tl.zeros([BLOCK_H], ACC_DTYPE)
            for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                dlog = tl.load(dlog_ptr + row + offs_c, mask=mask_c, other=0.0)
                w = tl.load(w1_ptr + offs_c[None, :].to(tl.int64) * C + offs_k[:, None],
                            mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
                dv += tl.sum(w * dlog[None, :], 1)
            tl.store(davg_ptr + row + offs_k, dv, mask=mask_k)
            tl.store(dmx_ptr + row + offs_k, tl.zeros([BLOCK_H], ACC_DTYPE), mask=mask_k)
