"""Plain host launchers, one per Triton kernel. Tests and benchmarks call them directly.

Every launcher of a big-tensor pass takes an activation that is dense in NCHW
(`p_contig=True`) or in channels_last (`p_contig=False`), see `dense_layout`. Grids,
splits and tile sizes come from the cached launch plan (plan.py), so a launch does no
planning work and the ahead-of-time compile test can build every configuration.

The small-map launchers take the plan, the carved workspace regions (`bufs`, a dict of
1-D views named as in the plan's layouts, or their device addresses on the fast launch
path) and the variant's flags (`Flags`). Every launcher issues its launch through
`run` (launch.py): Triton's JIT launch by default, or a capture or replay of compiled
kernels on the fast path.
"""
import dataclasses
import functools
import struct

import torch
import triton.language as tl

from .kernels.backward import (_bwd_gate_sums_kernel, _bwd_input_kernel, _bwd_input_rows_kernel,
                               _bwd_spatial_pool_kernel)
from .kernels.channel_gate import (_channel_gate_bwd_blocks_kernel, _channel_gate_bwd_kernel,
                                   _channel_gate_fwd_blocks_kernel, _channel_gate_fwd_kernel)
from .kernels.gate_apply import _gate_apply_kernel
from .kernels.pool_stats import _pool_stats_kernel
from .kernels.spatial_gate import (_bn_partials_reduce_kernel, _spatial_gate_bwd_kernel,
                                   _spatial_gate_bwd_stats_kernel, _spatial_gate_fwd_kernel)
from .kernels.weight_grads import _weight_grads_kernel
from .launch import jit_launch
from .plan import (CONV_GRAD_BLOCK, NUM_WARPS, SMALL_MAXNREG, SMALL_NUM_WARPS,
                   Reduction, acc_dtype, b1_blocks, b2_blocks, b3_rows, b3_rows_options,
                   big_pass_options, cdiv, unaligned_budget,
                   channel_split, bn_parts_block, cp_blocks, elementwise_position_groups,
                   loop_stages, pool_positions_contiguous, position_split, psi_bwd_options,
                   reduction_plan, row_align, sm_count_of, weight_grad_rows, weight_grad_samples)

# launch options of the small-map kernels (plan.py)
SMALL_OPTIONS = dict(num_warps=SMALL_NUM_WARPS, maxnreg=SMALL_MAXNREG)

POOL_CODES = {"avg+max": 0, "mean(avg,max)": 1, "avg": 2}
POOL_ORDER_CODES = {"max,mean": 0, "mean,max": 1, "mean(mean,max)": 2}


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _to_f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


@functools.lru_cache(maxsize=64)
def f64_pair(v: float):
    """(hi, lo) fp32 halves of v: Triton passes Python floats as fp32 (see plane._scalar)."""
    hi = _to_f32(v)
    return hi, _to_f32(v - hi)


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


@dataclasses.dataclass(frozen=True)
class Flags:
    """The compile-time description of a variant that the small-map kernels need."""
    pool: int               # POOL_CODES
    two_layers: bool
    has_b1: bool
    has_b2: bool
    spatial: bool
    pool_order: int         # POOL_ORDER_CODES (spatial only)
    kernel_size: int
    has_conv_bias: bool
    bn_mode: int            # 0 none, 1 running statistics, 2 batch statistics
    has_bn_w: bool
    has_bn_b: bool
    amax: bool

    def __post_init__(self):
        # hashed once: Flags are part of the fast launch path's key, hashed every call
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self):
        return self._hash

    @property
    def spatial_maps(self):
        return 1 if self.pool_order == 2 else 2


def flags_of(spec, w, bn_batch_stats: bool) -> Flags:
    return _flags(spec, w.fc2_weight is not None, w.fc1_bias is not None, w.fc2_bias is not None,
                  w.conv_bias is not None, w.has_bn, w.bn_weight is not None,
                  w.bn_bias is not None, bn_batch_stats)


@functools.lru_cache(maxsize=256)
def _flags(spec, two_layers, has_b1, has_b2, has_conv_bias, has_bn, has_bn_w, has_bn_b,
           bn_batch_stats) -> Flags:
    bn_mode = 0 if not (spec.has_spatial and has_bn) else (2 if bn_batch_stats else 1)
    return Flags(POOL_CODES[spec.channel_pool], two_layers, has_b1, has_b2, spec.has_spatial,
                 POOL_ORDER_CODES.get(spec.spatial_pool, 0), spec.kernel_size, has_conv_bias,
                 bn_mode, has_bn_w, has_bn_b, spec.amax)


def aligned_launch(ints, tensors) -> bool:
    """Whether Triton specializes a launch as aligned: each of `ints` (the kernel's sizes
    aot._DIVISIBLE_INTS names) divisible by 16 or equal to 1 (a constant then), and every
    tensor's address 16-byte aligned. Some kernels take a larger register budget when not
    (budget_aligned); the scratch regions are aligned by construction
    (plan.aligned), the input, weights and saved regions are looked at."""
    return (all(i % 16 == 0 or i == 1 for i in ints)
            and all(t.data_ptr() % 16 == 0 for t in tensors))


def budget_aligned(kernel_name: str, io_bytes: int, ints, tensors, **config) -> bool:
    """big_pass_options' `aligned` for a launch of kernel_name: True unless its
    configuration takes the unaligned register budget (plan.unaligned_budget, with
    `config`) and Triton specializes the launch as unaligned (aligned_launch; the
    addresses are looked at only then)."""
    return (not unaligned_budget(kernel_name, io_bytes, **config)
            or aligned_launch(ints, tensors))


def _or(t, fallback):
    """A tensor argument for a pointer the kernel does not read under its flags."""
    return fallback if t is None else t


# ---------------------------------------------------------------- F1, F2

def row_align_of(R: int, K: int, k_contig: bool, has_scale: bool) -> int:
    """plan.row_align of F1 (R = C, K = H*W) or F2 (scaled: R = H*W, K = C)."""
    return row_align(R if has_scale else K, pool_positions_contiguous(k_contig, has_scale))


def pool_stats_partials(x, R: int, K: int, k_contig: bool, red: Reduction, scale=None,
                        outs=None, hid_partial=None, run=jit_launch):
    """Per split s of the K axis: sum, max, first argmax and tie count over the split's
    columns of each sample's R x K plane. Returns four [N, S, R] tensors (sum and max in
    the accumulation dtype, argmax and count int32); `scale` ([N, K]) multiplies column k.
    `hid_partial` = (w1 [HID, R], hpart [N, r_blocks, 2, HID], pool mode, BLOCK_H): F1 with
    one split also forms the channel MLP's partial layer-1 rows (pool_stats.py)."""
    N = x.shape[0]
    if hid_partial is not None:
        assert red.splits == 1, "the layer-1 partials need finished statistics (one split)"
        w1, hpart, pool, block_h = hid_partial
        hidden = w1.shape[0]
    else:
        w1 = hpart = None
        hidden, pool, block_h = 1, 0, 1
    if outs is None:
        dt = acc_dtype(x.dtype)
        outs = (torch.empty(N, red.splits, R, device=x.device, dtype=dt),
                torch.empty(N, red.splits, R, device=x.device, dtype=dt),
                torch.empty(N, red.splits, R, device=x.device, dtype=torch.int32),
                torch.empty(N, red.splits, R, device=x.device, dtype=torch.int32))
    ptrs = (x, scale if scale is not None else outs[0], *outs, _or(w1, outs[0]), _or(hpart, outs[0]))
    aligned = budget_aligned("_pool_stats_kernel", x.element_size(), (R, K, red.k_per_split), ptrs,
                             k_contig=k_contig, has_scale=scale is not None)
    run(_pool_stats_kernel, (N * red.splits * red.r_blocks,),
        (*ptrs, R, K, red.k_per_split, red.r_blocks, red.splits, hidden),
        dict(HAS_SCALE=scale is not None, HID_PARTIAL=hid_partial is not None, POOL=pool,
             K_CONTIG=k_contig, ACC_DTYPE=_tl_acc(x.dtype),
             BLOCK_R=red.block_r, BLOCK_K=red.block_k, HAS_TAIL=K % red.block_k != 0,
             NUM_STAGES=red.stages, ROW_ALIGN=row_align_of(R, K, k_contig, scale is not None),
             BLOCK_H=block_h,
             HID_LOOP=block_h < hidden, **big_pass_options(hid_partial is not None, k_contig,
                                                           x.element_size(), aligned)))
    return outs


def channel_stats_partials(x, p_contig: bool, splits=None):
    """F1 on its own (tests): per-split channel statistics [N, S, C] over H*W."""
    N, C, H, W = x.shape
    red = reduction_plan(N, C, H * W, p_contig, x.dtype, sm_count_of(x), splits)
    return pool_stats_partials(x, C, H * W, p_contig, red), red


def spatial_stats_partials(x, ca, p_contig: bool, splits=None):
    """F2 on its own (tests): per-split spatial statistics [N, S, H*W] of x * ca."""
    N, C, H, W = x.shape
    red = reduction_plan(N, H * W, C, not p_contig, x.dtype, sm_count_of(x), splits)
    return pool_stats_partials(x, H * W, C, not p_contig, red, scale=ca.contiguous()), red


# ---------------------------------------------------------------- small maps, forward

def f1_hid_partial(plan, f: Flags, w, bufs):
    """The hid_partial argument of F1 in this plan (None unless plan.phi_blocks)."""
    if not plan.phi_blocks:
        return None
    return w.fc1_weight, bufs["hpart"], f.pool, plan.f1_block_h


def channel_gate_fwd(plan, f: Flags, w, bufs, saved, run=jit_launch):
    """phi: combine F1's partials, MLP, sigmoid -> saved avg, cmax, cidx, ccnt, h, ca.
    After an unsplit F1 that formed the layer-1 partials (plan.phi_blocks): parallel over
    (sample, channel range)."""
    if plan.phi_blocks:
        run(_channel_gate_fwd_blocks_kernel, (plan.N * plan.phi_c_programs,),
            (bufs["f1_sum"], bufs["f1_max"], bufs["f1_idx"], bufs["f1_cnt"], bufs["hpart"],
             _or(w.fc1_bias, w.fc1_weight), w.fc2_weight, _or(w.fc2_bias, w.fc1_weight),
             saved["avg"], saved["cmax"], saved["cidx"], saved["ccnt"], saved["h"], saved["ca"],
             plan.C, plan.P, plan.hidden, plan.f1.r_blocks, plan.phi_c_per_program,
             plan.phi_c_programs),
            dict(POOL=f.pool, HAS_B1=f.has_b1, HAS_B2=f.has_b2, ACC_DTYPE=_tl_acc(plan.dtype),
                 BLOCK_C=plan.phi_blocks_c, BLOCK_H=plan.phi_block_h,
                 BLOCK_RB=plan.phi_blocks_rb, **SMALL_OPTIONS))
        return
    run(_channel_gate_fwd_kernel, (plan.N,),
        (bufs["f1_sum"], bufs["f1_max"], bufs["f1_idx"], bufs["f1_cnt"],
         w.fc1_weight, _or(w.fc1_bias, w.fc1_weight), _or(w.fc2_weight, w.fc1_weight),
         _or(w.fc2_bias, w.fc1_weight),
         saved["avg"], saved["cmax"], saved["cidx"], saved["ccnt"], saved["h"], saved["ca"],
         plan.C, plan.P, plan.hidden, plan.f1.splits),
        dict(POOL=f.pool, TWO_LAYERS=f.two_layers, HAS_B1=f.has_b1, HAS_B2=f.has_b2,
             ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_C=plan.phi_block_c, BLOCK_H=plan.phi_block_h,
             BLOCK_S=plan.f1.block_s, **SMALL_OPTIONS))


def spatial_gate_fwd(plan, f: Flags, w, bufs, saved, eps: float, run=jit_launch):
    """psi: combine F2's partials, conv -> u, and sa (or BatchNorm partial moments), one
    program per (sample, block of plan.psi_rows rows)."""
    acc = saved["u"]
    eps_hi, eps_lo = f64_pair(eps)
    run(_spatial_gate_fwd_kernel, (plan.psi_programs,),
        (bufs["f2_sum"], bufs["f2_max"], bufs["f2_idx"], bufs["f2_cnt"],
         w.conv_weight, _or(w.conv_bias, acc), _or(w.bn_weight, acc), _or(w.bn_bias, acc),
         _or(w.bn_running_mean, acc), _or(w.bn_running_var, acc),
         saved["smean"], saved["smax"], saved["sidx"], saved["scnt"], saved["u"], saved["sa"],
         bufs["mom"], saved["bn_stats"], bufs["slab"],
         plan.C, plan.H, plan.W, plan.f2.splits, plan.psi_rows, plan.psi_row_blocks,
         plan.psi_slab, eps_hi, eps_lo),
        dict(POOL_ORDER=f.pool_order, KSIZE=f.kernel_size, HAS_CONV_BIAS=f.has_conv_bias,
             BN_MODE=f.bn_mode, HAS_BN_W=f.has_bn_w, HAS_BN_B=f.has_bn_b,
             ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_P=plan.psi_block_p, BLOCK_S=plan.f2.block_s,
             **plan.psi_conv(f.kernel_size), **SMALL_OPTIONS))


def bn_partials_reduce(parts, num_parts: int, moments: bool, run=jit_launch):
    """One row combining num_parts BatchNorm partial rows: (count, mean, M2) rows when
    `moments`, else (sum, sum) rows; for the all_gather of SyncBatchNorm."""
    out = parts.new_empty(3 if moments else 2)
    run(_bn_partials_reduce_kernel, (1,), (parts, out, num_parts),
        dict(MOMENTS=moments, ACC_DTYPE=_tl_acc(parts.dtype), **SMALL_OPTIONS))
    return out


# ---------------------------------------------------------------- F3

def big_pass_tiles(x, p_contig: bool, plan=None):
    """(BLOCK_C, BLOCK_P, channel blocks) of a big pass over x: the plan's when given
    (computed once per shape), else computed from x."""
    if plan is not None:
        return plan.block_c, plan.block_p, plan.c_blocks
    N, C, H, W = x.shape
    block_c, block_p = cp_blocks(C, H * W, p_contig, x.dtype)
    return block_c, block_p, cdiv(C, block_c)


def elementwise_groups(x, p_contig: bool, plan=None, blocks_per_program=None):
    """(position groups, positions per program) of F3 and B3 over x: the plan's when
    given, else computed from x (with `blocks_per_program` position blocks if given)."""
    if plan is not None:
        return plan.ew_groups, plan.ew_p_per_program
    N, C, H, W = x.shape
    return elementwise_position_groups(N, C, H * W, p_contig, x.dtype, sm_count_of(x),
                                       blocks_per_program)


def gate_apply(x, ca, p_contig: bool, sa=None, u=None, mom=None, num_parts=0, bn_stats=None,
               w=None, eps=0.0, momentum=0.0, track=False, out=None, plan=None,
               blocks_per_program=None, run=jit_launch):
    """F3: out = x * ca * sa, in x's dtype and layout (into `out` when given).

    sa given: the spatial gate; u and mom given (batch-statistics BatchNorm): sa is made
    here from u and the combined moments, stored into `sa` (required then), and the
    running statistics in w are updated when `track`. Neither: channel gate only.
    `plan`: the block's plan, whose tiles and position groups are used (else computed
    here, with `blocks_per_program` position blocks per program if given).
    """
    N, C, H, W = x.shape
    P = H * W
    if out is None:
        out = torch.empty_like(x)
    block_c, block_p, ncb = big_pass_tiles(x, p_contig, plan)
    groups, p_per_program = elementwise_groups(x, p_contig, plan, blocks_per_program)
    sa_mode = 2 if mom is not None else (1 if sa is not None else 0)
    dummy = ca
    bnw = bnb = rm = rv = nbt = None
    if w is not None:
        bnw, bnb, rm, rv, nbt = (w.bn_weight, w.bn_bias, w.bn_running_mean, w.bn_running_var,
                                 w.bn_num_batches_tracked)
    eps_hi, eps_lo = f64_pair(eps)
    mom_hi, mom_lo = f64_pair(momentum)
    run(_gate_apply_kernel, (N * ncb * groups,),
        (x, ca, _or(sa, dummy), _or(u, dummy), _or(mom, dummy), _or(bnw, dummy), _or(bnb, dummy),
         _or(rm, dummy), _or(rv, dummy), _or(nbt, dummy), _or(bn_stats, dummy), out,
         C, P, ncb, groups, p_per_program, num_parts, eps_hi, eps_lo, mom_hi, mom_lo),
        dict(SA_MODE=sa_mode, BLOCK_PARTS=bn_parts_block(x.dtype),
             HAS_BN_W=bnw is not None, HAS_BN_B=bnb is not None,
             TRACK=bool(track and rm is not None), HAS_NBT=bool(track and nbt is not None),
             P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
             BLOCK_C=block_c, BLOCK_P=block_p, LOOP=p_per_program > block_p,
             ROW_ALIGN=row_align(P, p_contig), num_warps=NUM_WARPS))
    return out


# ---------------------------------------------------------------- backward big passes

def bwd_gate_sums(g, x, ca, sa, p_contig: bool, splits=None, gs_part=None, gc_part=None,
                  plan=None, run=jit_launch):
    """B1: partial rows of Gs[n, p] = sum_c g*x*ca over channel splits ([N, CS, P], None
    without sa) and of Gc1[n, c] = sum_p g*x*sa over position blocks ([N, PB, C]).
    `plan`: the block's plan, whose tiles and splits are used (else computed here)."""
    N, C, H, W = x.shape
    P = H * W
    dt = acc_dtype(x.dtype)
    if plan is not None:
        block_c, block_p, npb = plan.b1_block_c, plan.b1_block_p, plan.b1_p_blocks
        splits, c_per_split = plan.b1_splits, plan.b1_c_per_split
    else:
        block_c, block_p = b1_blocks(C, P, p_contig, x.dtype)
        npb = cdiv(P, block_p)
        splits, c_per_split = channel_split(N, C, P, p_contig, x.dtype, sm_count_of(x),
                                            splits)
    has_sa = sa is not None
    if has_sa and gs_part is None:
        gs_part = torch.empty(N, splits, P, device=x.device, dtype=dt)
    if gc_part is None:
        gc_part = torch.empty(N, npb, C, device=x.device, dtype=dt)
    run(_bwd_gate_sums_kernel, (N * splits * npb,),
        (g, x, ca, sa if has_sa else ca, gs_part if has_sa else gc_part, gc_part,
         C, P, c_per_split, npb, splits),
        dict(HAS_SA=has_sa, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
             BLOCK_C=block_c, BLOCK_P=block_p, NUM_STAGES=loop_stages(c_per_split, block_c),
             ROW_ALIGN=row_align(P, p_contig), num_warps=NUM_WARPS))
    return (gs_part if has_sa else None), gc_part


def bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig: bool, amax: bool, out=None,
                     plan=None, splits=None, dr_partial=None, run=jit_launch):
    """B2: partial rows [N, PS, C] over PS position splits of Gc2[n, c] = sum_p x *
    (dsmean/C + dsmax * e_k), the part of dL/dca through the spatial pools (into `out`
    when given). `plan`: the block's plan, whose tiles and splits are used (else computed
    here, with `splits` if given). `dr_partial` = (gc_part [N, PB, C], PB, BLOCK_PB, w2
    [C, HID], dlog [N, C], drpart [N, channel blocks, HID], BLOCK_H): B2 with one split
    instead adds B1's Gc1 rows and writes dlogits and the partial rows of W2^T dlogits
    (backward.py); `out` is then not written."""
    N, C, H, W = x.shape
    P = H * W
    if plan is not None:
        block_c, block_p, ncb = plan.b2_block_c, plan.b2_block_p, plan.b2_c_blocks
        splits, p_per_split = plan.b2_splits, plan.b2_p_per_split
    else:
        block_c, block_p = b2_blocks(N, C, P, p_contig, x.dtype, sm_count_of(x))
        ncb = cdiv(C, block_c)
        splits, p_per_split = position_split(N, C, P, p_contig, x.dtype, sm_count_of(x),
                                             splits)
    if out is None:
        out = torch.empty(N, splits, C, device=x.device, dtype=acc_dtype(x.dtype))
    if dr_partial is not None:
        assert splits == 1, "dlogits need finished Gc2 rows (one split)"
        gc_part, pb, block_pb, w2, dlog, drpart, block_h = dr_partial
        hidden = w2.shape[1]
    else:
        gc_part = w2 = dlog = drpart = None
        block_pb, pb, hidden, block_h = 1, 1, 1, 1
    ptrs = (x, ca, dsmean, dsmax, smax, sidx, scnt, out, _or(gc_part, out), _or(w2, out),
            _or(dlog, out), _or(drpart, out))
    run(_bwd_spatial_pool_kernel, (N * ncb * splits,),
        (*ptrs, C, P, p_per_split, ncb, splits, pb, hidden),
        dict(AMAX=amax, DR_PARTIAL=dr_partial is not None, P_CONTIG=p_contig,
             ACC_DTYPE=_tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p,
             NUM_STAGES=loop_stages(p_per_split, block_p), ROW_ALIGN=row_align(P, p_contig),
             BLOCK_PB=block_pb, BLOCK_H=block_h,
             HID_LOOP=block_h < hidden,
             **big_pass_options(aligned=budget_aligned(
                 "_bwd_spatial_pool_kernel", x.element_size(), (C, P, p_per_split), ptrs,
                 p_contig=p_contig))))
    return out


def b2_dr_partial(plan, w, bufs):
    """The dr_partial argument of B2 in this plan (None unless plan.phi_bwd_blocks)."""
    if not plan.phi_bwd_blocks:
        return None
    return (bufs["gc_part"], plan.b1_p_blocks, plan.bwd_block_pb, w.fc2_weight, bufs["dlog"],
            bufs["drpart"], plan.b2_block_h)


def bwd_input(g, x, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx, ccnt,
              p_contig: bool, amax: bool, dx=None, plan=None, blocks_per_program=None,
              rows=None, run=jit_launch):
    """B3: dx = (g*sa + dsmean/C + dsmax*e_k)*ca + davg/P + dmx*e_j, in g's dtype and layout
    (into `dx` when given).

    Without a spatial gate pass sa (and the spatial tensors) as None. `plan`: the block's
    plan, whose choices are used (else computed here). By rows (plan.b3_rows) where the
    contiguous axis allows, else by tiles (with `blocks_per_program` position blocks per
    program if given). rows: force (BLOCK_K, STEPS), or (0, 0) for the tile kernel.
    """
    N, C, H, W = x.shape
    P = H * W
    if dx is None:
        dx = torch.empty_like(g)
    has_sa = sa is not None
    sp = (sa, dsmean, dsmax, smax, sidx, scnt) if has_sa else (ca, ca, ca, ca, cidx, ccnt)
    if rows is None:
        rows = ((plan.b3_block_k, plan.b3_steps) if plan is not None else
                b3_rows(N, C, P, p_contig, x.dtype, sm_count_of(x)))
    block_k, steps = rows
    if block_k:
        k_blocks = cdiv(P if p_contig else C, block_k)
        r_groups = cdiv(C if p_contig else P, steps)
        run(_bwd_input_rows_kernel, (N * k_blocks * r_groups,),
            (g, x, ca, *sp, davg, dmx, mx, cidx, ccnt, dx, C, P, k_blocks, r_groups),
            dict(HAS_SA=has_sa, AMAX=amax, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
                 BLOCK_K=block_k, STEPS=steps, ROW_ALIGN=row_align(P, p_contig),
                 **b3_rows_options()))
        return dx
    block_c, block_p, ncb = big_pass_tiles(x, p_contig, plan)
    groups, p_per_program = elementwise_groups(x, p_contig, plan, blocks_per_program)
    run(_bwd_input_kernel, (N * ncb * groups,),
        (g, x, ca, *sp, davg, dmx, mx, cidx, ccnt, dx, C, P, ncb, groups, p_per_program),
        dict(HAS_SA=has_sa, AMAX=amax, P_CONTIG=p_contig, ACC_DTYPE=_tl_acc(x.dtype),
             BLOCK_C=block_c, BLOCK_P=block_p, LOOP=p_per_program > block_p,
             ROW_ALIGN=row_align(P, p_contig), num_warps=NUM_WARPS))
    return dx


# ---------------------------------------------------------------- small maps, backward

def spatial_gate_bwd_stats(plan, f: Flags, saved, bufs, run=jit_launch):
    """ds = Gs * sa * (1 - sa) and the BatchNorm-backward sums of each program's rows."""
    run(_spatial_gate_bwd_stats_kernel, (plan.psi_programs,),
        (bufs["gs_part"], saved["sa"], saved["u"], saved["bn_stats"], bufs["ds"], bufs["bsums"],
         plan.H, plan.W, plan.b1_splits, plan.psi_rows, plan.psi_row_blocks),
        dict(BN_MODE=f.bn_mode, ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_P=plan.psi_block_p,
             BLOCK_CS=plan.bwd_block_cs, **SMALL_OPTIONS))


def spatial_gate_bwd(plan, f: Flags, w, saved, bufs, sums, num_parts: int, run=jit_launch):
    """dsmean/dsmax through BatchNorm and the conv, and the conv gradient rows of each
    program's rows."""
    acc = saved["u"]
    conv = plan.psi_bwd_conv(f.kernel_size)
    run(_spatial_gate_bwd_kernel, (plan.psi_programs,),
        (bufs["ds"], saved["u"], saved["bn_stats"], sums, _or(w.bn_weight, acc), w.conv_weight,
         saved["smean"], saved["smax"], bufs["dsmean"], bufs["dsmax"], bufs["cgrad"],
         bufs["cgrad_part"],
         plan.H, plan.W, plan.psi_rows, plan.psi_row_blocks, num_parts),
        dict(POOL_ORDER=f.pool_order, KSIZE=f.kernel_size, BN_MODE=f.bn_mode,
             HAS_BN_W=f.has_bn_w, ACC_DTYPE=_tl_acc(plan.dtype),
             BLOCK_PARTS=bn_parts_block(plan.dtype),
             **conv, **psi_bwd_options(conv, f.bn_mode)))


def channel_gate_bwd(plan, f: Flags, w, saved, bufs, run=jit_launch):
    """dlogits, dh, davg, dmx per sample, from B1's Gc1 and B2's Gc2 partial rows; after an
    unsplit B2 that formed dlogits and the W2^T dlogits partials (plan.phi_bwd_blocks): dh,
    davg, dmx parallel over (sample, channel range)."""
    if plan.phi_bwd_blocks:
        run(_channel_gate_bwd_blocks_kernel, (plan.N * plan.phi_c_programs,),
            (bufs["drpart"], saved["h"], w.fc1_weight, bufs["dh"], bufs["davg"], bufs["dmx"],
             plan.C, plan.hidden, plan.b2_c_blocks, plan.phi_c_per_program, plan.phi_c_programs),
            dict(POOL=f.pool, ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_C=plan.phi_blocks_c,
                 BLOCK_H=plan.phi_block_h, BLOCK_RB=plan.phi_blocks_rb, **SMALL_OPTIONS))
        return
    run(_channel_gate_bwd_kernel, (plan.N,),
        (bufs["gc_part"], bufs["gc2_part"], saved["ca"], saved["h"], w.fc1_weight,
         _or(w.fc2_weight, w.fc1_weight), bufs["dlog"], bufs["dh"], bufs["davg"], bufs["dmx"],
         plan.C, plan.hidden, plan.b1_p_blocks, plan.b2_splits),
        dict(POOL=f.pool, TWO_LAYERS=f.two_layers, HAS_GC2=f.spatial,
             ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_C=plan.phi_bwd_block_c,
             BLOCK_H=plan.phi_block_h, BLOCK_PB=plan.bwd_block_pb,
             BLOCK_PS2=plan.bwd_block_ps2, **SMALL_OPTIONS))


GRAD_FIELDS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight", "conv_bias",
               "bn_weight", "bn_bias")


def empty_weight_grads(w):
    """{field: uninitialized gradient} for every parameter present, in the parameter's
    dtype and shape, dense row-major (the block's weights arrive so: function.dense_weights;
    empty_like keeps a contiguous tensor's strides, and skips a memory-format argument)."""
    return {name: torch.empty_like(t) if t.is_contiguous()
            else torch.empty_like(t, memory_format=torch.contiguous_format)
            for name, t in zip(GRAD_FIELDS, w) if t is not None}


def weight_grads(plan, f: Flags, w, saved, bufs, grads=None, run=jit_launch):
    """Every parameter gradient of the small maps, in each parameter's dtype and shape:
    {field: gradient} for the parameters present (written into `grads` when given, as
    empty_weight_grads makes it)."""
    if grads is None:
        grads = empty_weight_grads(w)
    dummy = saved["ca"]
    cg = f.spatial_maps * f.kernel_size ** 2 + 1
    run(_weight_grads_kernel, (plan.wg_tiles1 + plan.wg_tiles2 + 1,),
        (saved["avg"], saved["cmax"], saved["h"], bufs["dh"], bufs["dlog"],
         bufs["cgrad"] if f.spatial else dummy, bufs["bsums"] if f.bn_mode else dummy,
         *[grads.get(name, dummy) for name in GRAD_FIELDS],
         plan.N, plan.C, plan.hidden, cg, plan.psi_programs, plan.wg_tiles1, plan.wg_tiles2,
         plan.wg_rows1, plan.wg_rows2),
        dict(POOL=f.pool, TWO_LAYERS=f.two_layers, HAS_B1=f.has_b1, HAS_B2=f.has_b2,
             HAS_CONV=f.spatial, HAS_CONV_BIAS=f.has_conv_bias,
             HAS_BN_W=f.has_bn_w and f.bn_mode > 0, HAS_BN_B=f.has_bn_b and f.bn_mode > 0,
             ACC_DTYPE=_tl_acc(plan.dtype), BLOCK_R=plan.wg_tile, BLOCK_K=plan.wg_tile,
             BLOCK_N=weight_grad_samples(plan.dtype, plan.wg_tile), BLOCK_G=CONV_GRAD_BLOCK,
             BLOCK_NR=weight_grad_rows(plan.dtype), **SMALL_OPTIONS))
    return grads


# Every function above that launches a kernel (tests replace them to prove none runs).
LAUNCHERS = ("pool_stats_partials", "channel_gate_fwd", "spatial_gate_fwd", "bn_partials_reduce",
             "gate_apply", "bwd_gate_sums", "bwd_spatial_pool", "bwd_input",
             "spatial_gate_bwd_stats", "spatial_gate_bwd", "channel_gate_bwd", "weight_grads")
