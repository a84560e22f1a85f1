"""Plain host launchers, one per Triton kernel. Tests and benchmarks call them directly.

Every launcher takes an activation that is dense in NCHW (`p_contig=True`) or in
channels_last (`p_contig=False`), see `dense_layout`. Block shapes come from the
finite table `tile_config`, so the ahead-of-time compile test can build every
configuration a launch can pick.
"""
import functools

import torch
import triton
import triton.language as tl

from .kernels.backward import _bwd_gate_sums_kernel, _bwd_input_kernel, _bwd_spatial_pool_kernel
from .kernels.gate_apply import _gate_apply_kernel
from .kernels.pool_stats import _combine_stats_kernel, _pool_stats_kernel

# Tile: TILE_ELEMENTS elements (half for fp64, whose doubled registers spill otherwise),
# CONTIG_BLOCKS[i] of them along the contiguous dimension.
TILE_ELEMENTS = 1024
CONTIG_BLOCKS = (32, 128)
NUM_WARPS = 4
MAX_SPLITS = 64  # partial rows merged by one _combine_stats_kernel tile


def tile_config(contig_extent: int, dtype: torch.dtype):
    """(contiguous block, other block) for a plane whose contiguous dimension has this extent."""
    contig = CONTIG_BLOCKS[0] if contig_extent <= CONTIG_BLOCKS[0] else CONTIG_BLOCKS[-1]
    elements = TILE_ELEMENTS // 2 if dtype == torch.float64 else TILE_ELEMENTS
    return contig, elements // contig


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dense_layout(x: torch.Tensor):
    """(x, p_contig): x itself when dense NCHW or channels_last, else one contiguous copy.

    When both hold (H*W == 1 or C == 1, say) the longer contiguous run wins: a 2048x1x1
    map is read along its channels, not one element per row.
    """
    nchw = x.is_contiguous()
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    if nchw and nhwc:
        return x, x.shape[2] * x.shape[3] >= x.shape[1]
    if nchw or nhwc:
        return x, nchw
    return x.contiguous(), True


def as_layout(t: torch.Tensor, p_contig: bool):
    """t in the given layout (a copy only when it is not already so)."""
    fmt = torch.contiguous_format if p_contig else torch.channels_last
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(device: torch.device, base_programs: int, max_splits: int) -> int:
    """Splits of the reduced axis so a launch fills the GPU: about two programs per SM.

    On the CPU (the interpreter runs one program at a time) there is nothing to fill.
    """
    if device.type != "cuda":
        return 1
    want = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if base_programs >= want:
        return 1
    return max(1, min(triton.cdiv(want, base_programs), max_splits, MAX_SPLITS))


def pool_stats(x, R: int, K: int, k_contig: bool, scale=None, splits=None):
    """Sum, max, first argmax and tie count over the K axis of each sample's R x K plane.

    Returns four [N, R] tensors: sum and max in the accumulation dtype, argmax and
    count in int32. `scale` ([N, K], accumulation dtype) multiplies column k first.
    """
    N = x.shape[0]
    dt = acc_dtype(x.dtype)
    (scale,) = _rows(scale)
    contig, other = tile_config(K if k_contig else R, x.dtype)
    block_k, block_r = (contig, other) if k_contig else (other, contig)
    num_r_blocks = triton.cdiv(R, block_r)
    k_blocks = triton.cdiv(K, block_k)
    if splits is None:
        splits = default_splits(x.device, N * num_r_blocks, k_blocks)
    splits = max(1, min(splits, k_blocks, MAX_SPLITS))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(K, k_per_split)

    outs = (torch.empty(N, splits, R, device=x.device, dtype=dt),
            torch.empty(N, splits, R, device=x.device, dtype=dt),
            torch.empty(N, splits, R, device=x.device, dtype=torch.int32),
            torch.empty(N, splits, R, device=x.device, dtype=torch.int32))
    grid = (N * splits * num_r_blocks,)
    _pool_stats_kernel[grid](
        x, scale if scale is not None else outs[0], *outs,
        R, K, k_per_split, num_r_blocks, splits,
        HAS_SCALE=scale is not None, K_CONTIG=k_contig, ACC_DTYPE=_tl_acc(x.dtype),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=NUM_WARPS)
    if splits == 1:
        return tuple(o.view(N, R) for o in outs)
    final = (torch.empty(N, R, device=x.device, dtype=dt),
             torch.empty(N, R, device=x.device, dtype=dt),
             torch.empty(N, R, device=x.device, dtype=torch.int32),
             torch.empty(N, R, device=x.device, dtype=torch.int32))
    block_s = triton.next_power_of_2(splits)
    block_r = max(1, TILE_ELEMENTS // block_s)
    num_r_blocks = triton.cdiv(R, block_r)
    _combine_stats_kernel[(N * num_r_blocks,)](
        *outs, *final, R, splits, num_r_blocks,
        ACC_DTYPE=_tl_acc(x.dtype), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=NUM_WARPS)
    return final


def channel_stats(x, p_contig: bool, splits=None):
    """F1: per (n, c) sum, max, first argmax and tie count over the H*W positions."""
    N, C, H, W = x.shape
    return pool_stats(x, C, H * W, p_contig, splits=splits)


def spatial_stats(x, ca, p_contig: bool, splits=None):
    """F2: per (n, p) sum, max, first argmax and tie count of y = x * ca over channels."""
    N, C, H, W = x.shape
    return pool_stats(x, H * W, C, not p_contig, scale=ca, splits=splits)


def _rows(*ts):
    """Small [N, C] / [N, P] operands as contiguous rows (a no-op when they already are)."""
    return [None if t is None else t.contiguous() for t in ts]


def _cp_blocks(C: int, P: int, p_contig: bool, dtype):
    contig, other = tile_config(P if p_contig else C, dtype)
    return (other, contig) if p_contig else (contig, other)  # (BLOCK_C, BLOCK_P)


def gate_apply(x, ca, sa, p_contig: bool):
    """F3: out = x * ca * sa, in x's dtype and layout. sa None: channel gate only."""
    N, C, H, W = x.shape
    P = H * W
    out = torch.empty_like(x)
    ca, sa = _rows(ca, sa)
    block_c, block_p = _cp_blocks(C, P, p_contig, x.dtype)
    ncb, npb = triton.cdiv(C, block_c), triton.cdiv(P, block_p)
    _gate_apply_kernel[(N * ncb * npb,)](
        x, ca, sa if sa is not None else ca, out, C, P, ncb, npb,
        HAS_SA=sa is not None, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    return out


def bwd_gate_sums(g, x, ca, sa, p_contig: bool, splits=None):
    """B1: Gs[n, p] = sum_c g*x*ca (None without sa) and Gc1[n, c] = sum_p g*x*sa."""
    N, C, H, W = x.shape
    P = H * W
    dt = acc_dtype(x.dtype)
    ca, sa = _rows(ca, sa)
    block_c, block_p = _cp_blocks(C, P, p_contig, x.dtype)
    npb = triton.cdiv(P, block_p)
    c_blocks = triton.cdiv(C, block_c)
    if splits is None:
        splits = default_splits(x.device, N * npb, c_blocks)
    splits = max(1, min(splits, c_blocks))
    c_per_split = triton.cdiv(c_blocks, splits) * block_c
    splits = triton.cdiv(C, c_per_split)
    has_sa = sa is not None
    gs_part = torch.empty(N, splits, P, device=x.device, dtype=dt) if has_sa else None
    gc_part = torch.empty(N, npb, C, device=x.device, dtype=dt)
    _bwd_gate_sums_kernel[(N * splits * npb,)](
        g, x, ca, sa if has_sa else ca, gs_part if has_sa else gc_part, gc_part,
        C, P, c_per_split, npb, splits,
        HAS_SA=has_sa, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    gs = gs_part.sum(1) if has_sa else None
    return gs, gc_part.sum(1)


def bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig: bool, amax: bool):
    """B2: Gc2[n, c] = sum_p x * (dsmean/C + dsmax * e_k), the part of dL/dca through the spatial pools."""
    N, C, H, W = x.shape
    P = H * W
    ca, dsmean, dsmax, smax, sidx, scnt = _rows(ca, dsmean, dsmax, smax, sidx, scnt)
    block_c, block_p = _cp_blocks(C, P, p_contig, x.dtype)
    ncb = triton.cdiv(C, block_c)
    gc2 = torch.empty(N, C, device=x.device, dtype=acc_dtype(x.dtype))
    _bwd_spatial_pool_kernel[(N * ncb,)](
        x, ca, dsmean, dsmax, smax, sidx, scnt, gc2, C, P, ncb,
        AMAX=amax, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    return gc2


def bwd_input(g, x, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx, ccnt,
              p_contig: bool, amax: bool):
    """B3: dx = (g*sa + dsmean/C + dsmax*e_k)*ca + davg/P + dmx*e_j, in g's dtype and layout.

    Without a spatial gate pass sa (and the spatial tensors) as None.
    """
    N, C, H, W = x.shape
    P = H * W
    dx = torch.empty_like(g)
    ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx, ccnt = _rows(
        ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx, ccnt)
    block_c, block_p = _cp_blocks(C, P, p_contig, x.dtype)
    ncb, npb = triton.cdiv(C, block_c), triton.cdiv(P, block_p)
    has_sa = sa is not None
    sp = (sa, dsmean, dsmax, smax, sidx, scnt) if has_sa else (ca, ca, ca, ca, cidx, ccnt)
    _bwd_input_kernel[(N * ncb * npb,)](
        g, x, ca, *sp, davg, dmx, mx, cidx, ccnt, dx, C, P, ncb, npb,
        HAS_SA=has_sa, AMAX=amax, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    return dx
