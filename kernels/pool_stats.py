"""Forward passes F1 and F2: sum, max, first argmax and tie count along one axis.

F1 (channel statistics) reduces x over the H*W positions of each channel:
plane R = C, K = H*W. F2 (spatial statistics) reduces y = x * ca over the
channels of each position: plane R = H*W, K = C, with ca as a per-column scale.
Both are the same computation, so one kernel serves both.

A long K can be split over several programs (S splits); each writes a partial
row, and the small-map kernel that reads the statistics next merges the S partials in
a fixed order (plane._combined_stats), so the result is deterministic with no atomics
and the split costs no launch.

F1 unsplit (one split) can also start the channel map: each program then holds the
finished statistics of its BLOCK_R channels and multiplies them into the matching
columns of W1 (HID_PARTIAL), so the channel-map kernel only adds one partial row per
channel block instead of walking all of W1 per sample (channel_gate.py).
"""
import triton
import triton.language as tl

from .channel_gate import _mlp_inputs, _weight_slice_products
from .plane import NO_INDEX, _below, _finalize_max_stats, _plane_offsets


@triton.jit
def _running_stats_step(v, scale_ptr, n, K, offs_k, k0, mask_k, acc_sum, acc_max, acc_tile,
                        acc_cnt, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    """One tile's update of each lane's running (sum, max, tile of the first max, count).

    v [BLOCK_R, BLOCK_K] holds the tile at columns offs_k = k0 + j (masked columns read as
    0; MASKED: mask_k [BLOCK_K] marks the valid ones, else all are). A lane's column j is
    the same in every tile, so a lane keeps the tile start k0 where its max was first
    reached, not the column: one select per element, no index arithmetic.

        bigger = v > max, or v is NaN and max is not (NaN is the largest, torch.max)
        max    = v if bigger else max;     tile = k0 if bigger else tile
        cnt    = (0 if bigger else cnt) + (v == max)   (a NaN max counts 0: the caller
                                                        sets its lane's count to 1)

    Lanes visit columns in increasing order, so the first update is the first index.
    """
    v = v.to(ACC_DTYPE)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + n.to(tl.int64) * K + offs_k, mask=offs_k < K, other=0.0)
        v = v * sc[None, :]
    acc_sum += v  # masked lanes hold 0
    # not (v <= max) is v > max or either is NaN; and max == max excludes a NaN max
    bigger = (~(v <= acc_max)) & (acc_max == acc_max)
    if MASKED:
        bigger = bigger & mask_k[None, :]
    acc_max = tl.where(bigger, v, acc_max)
    hit = v == acc_max
    if MASKED:
        hit = hit & mask_k[None, :]
    acc_cnt = tl.where(bigger, 0, acc_cnt) + hit.to(tl.int32)
    acc_tile = tl.where(bigger, k0, acc_tile)
    return acc_sum, acc_max, acc_tile, acc_cnt


@triton.jit
def _pool_stats_kernel(
    x_ptr,      # [N, R x K plane], input dtype, layout given by K_CONTIG
    scale_ptr,  # [N, K] ACC_DTYPE, multiplies column k (HAS_SCALE); else unused
    sum_ptr,    # [N, S, R] ACC_DTYPE   sum over the split's columns
    max_ptr,    # [N, S, R] ACC_DTYPE   max (NaN-propagating)
    idx_ptr,    # [N, S, R] int32       first column reaching the max
    cnt_ptr,    # [N, S, R] int32       number of columns equal to the max
    w1_ptr,     # [HID, R] first-layer weights of the channel MLP (HID_PARTIAL), any float dtype
    hpart_ptr,  # [N, num_r_blocks, 2, HID] ACC_DTYPE out: partial layer-1 rows (HID_PARTIAL)
    R, K,
    k_per_split,   # columns per split, a multiple of BLOCK_K
    num_r_blocks, num_splits, HID,
    HAS_SCALE: tl.constexpr,
    HID_PARTIAL: tl.constexpr,  # F1 with one split: also the partial layer-1 rows
    POOL: tl.constexpr,         # the channel MLP's inputs (channel_gate._mlp_inputs)
    K_CONTIG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_TAIL: tl.constexpr,    # K % BLOCK_K != 0: the last split ends in a short tile
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the K loop (1: none)
    ROW_ALIGN: tl.constexpr,   # the contiguous extent's known divisor (plane._plane_offsets)
    BLOCK_H: tl.constexpr,     # hidden units per step of the layer-1 partial (HID_PARTIAL)
    HID_LOOP: tl.constexpr,    # BLOCK_H < HID: the partial loops over hidden blocks
):
    """v[r, k] = x[r, k] * scale[k];   for each row r over k in the split:
         sum = sum_k v,  max = max_k v,  idx = min{k : v == max},  cnt = #{k : v == max}

    HID_PARTIAL (num_splits == 1, R = C, K = H*W):  with avg = sum / K and v_b the MLP
    inputs (_mlp_inputs), for this program's channel block B:
         hpart[n, rb, b, j] = sum_{c in B} W1[j, c] * v_b[c]          (b = 1 for POOL 0 only)

    Each lane keeps its own running (sum, max, idx, cnt) across the loop; lanes
    are merged once at the end. Columns are visited in increasing order per lane,
    so the first index is the first update; ties keep the smaller index.
    """
    pid = tl.program_id(0)
    rb = pid % num_r_blocks
    s = (pid // num_r_blocks) % num_splits
    n = pid // (num_r_blocks * num_splits)

    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R  # (F2 in NCHW: a mask per element; _below's costs more in the SASS)
    x_base = x_ptr + n.to(tl.int64) * R * K
    k_start = s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    # Full tiles need no column mask in the update; the split's last, short tile does.
    if HAS_TAIL:
        k_full_end = k_start + ((k_end - k_start) // BLOCK_K) * BLOCK_K
    else:
        k_full_end = k_end
    acc_sum = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
    acc_max = tl.full([BLOCK_R, BLOCK_K], float("-inf"), ACC_DTYPE)
    acc_tile = tl.full([BLOCK_R, BLOCK_K], 0, tl.int32) + k_start
    acc_cnt = tl.zeros([BLOCK_R, BLOCK_K], tl.int32)
    for k0 in tl.range(k_start, k_full_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_base + _plane_offsets(offs_r, offs_k, R, K, K_CONTIG, ROW_ALIGN),
                    mask=mask_r[:, None], other=0.0)
        acc_sum, acc_max, acc_tile, acc_cnt = _running_stats_step(
            v, scale_ptr, n, K, offs_k, k0, offs_k < k_end, acc_sum, acc_max, acc_tile, acc_cnt,
            HAS_SCALE, False, ACC_DTYPE)
    if HAS_TAIL:
        if k_full_end < k_end:
            offs_k = k_full_end + tl.arange(0, BLOCK_K)
            mask_k = _below(offs_k, k_end, ROW_ALIGN) if K_CONTIG else offs_k < k_end
            v = tl.load(x_base + _plane_offsets(offs_r, offs_k, R, K, K_CONTIG, ROW_ALIGN),
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc_sum, acc_max, acc_tile, acc_cnt = _running_stats_step(
                v, scale_ptr, n, K, offs_k, k_full_end, mask_k, acc_sum, acc_max, acc_tile,
                acc_cnt, HAS_SCALE, True, ACC_DTYPE)
    # A NaN max never equals itself, so its lane counted 0: it holds one maximum (the
    # first NaN). A lane's first maximum sits at its tile's start plus the lane's column
    # in the tile; a lane that saw no column (cnt = 0) offers no index.
    acc_cnt = tl.where(acc_max != acc_max, 1, acc_cnt)
    acc_idx = tl.where(acc_cnt > 0, acc_tile + tl.arange(0, BLOCK_K)[None, :], NO_INDEX)

    total, m, idx, cnt = _finalize_max_stats(acc_sum, acc_max, acc_idx, acc_cnt, 1)
    out = (n.to(tl.int64) * num_splits + s) * R + offs_r
    tl.store(sum_ptr + out, total, mask=mask_r)
    tl.store(max_ptr + out, m, mask=mask_r)
    tl.store(idx_ptr + out, idx, mask=mask_r)
    tl.store(cnt_ptr + out, cnt, mask=mask_r)
    if HID_PARTIAL:
        v_a, v_m = _mlp_inputs(total / tl.cast(K, ACC_DTYPE), m, POOL)
        _weight_slice_products(w1_ptr, R, 1, offs_r, mask_r, tl.where(mask_r, v_a, 0.0),
                               tl.where(mask_r, v_m, 0.0), hpart_ptr,
                               (n.to(tl.int64) * num_r_blocks + rb) * 2 * HID, HID, POOL == 0,
                               HID_LOOP, ACC_DTYPE, BLOCK_H, NUM_STAGES)
