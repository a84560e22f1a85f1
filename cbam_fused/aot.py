"""Ahead-of-time builds of every kernel configuration the launchers can pick, with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` turns each
kernel into PTX and a cubin for sm_80 / sm_90 on a CPU-only machine; `ptxas -v`
then reports registers, spills and shared memory. This catches what the
interpreter cannot: unsupported operations, layout errors, register spills, and
whether the contiguous dimension is read and written 16 bytes at a time.

Builds use the specialization a real launch of a typical shape gets: 16-byte
aligned pointers and plane sizes divisible by 16 (Triton specializes integer
arguments on divisibility by 16 at launch). Real launches also get the others, and
each is built too (`_unaligned`): sizes not divisible by 16 (H*W = 49 or 196, an odd C,
a split of an odd number of 8-wide blocks) with every tile of the big passes, and
those with every pointer off a 16-byte boundary as well (a saved-workspace region at
odd N*C or N*H*W, an input or weight that is a view at an odd offset) per kernel,
dtype and layout. A launch also turns every integer
argument equal to 1 into a compile-time constant (a plain int inside the kernel):
C = 1, H*W = 1, a single block or a single split. So each configuration is built
once more with every such integer set to 1 together, and once with each alone set
to 1. Integers are handled the same whatever the tile width and the I/O dtype, so
these builds take one tile width, fp32 I/O (all subsets) and fp64 (all ones: its
accumulation casts differ). fp16 I/O compiles to the bf16 code but for its conversions:
one fp16 build per kernel, layout and tile (`_fp16_representatives`).
"""
import dataclasses
import functools
import itertools
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl

from . import plan as PL
from .kernels.backward import (_bwd_gate_sums_kernel, _bwd_input_kernel, _bwd_input_rows_kernel,
                               _bwd_spatial_pool_kernel)
from .kernels.channel_gate import (_channel_gate_bwd_blocks_kernel, _channel_gate_bwd_kernel,
                                   _channel_gate_fwd_blocks_kernel, _channel_gate_fwd_kernel)
from .kernels.gate_apply import _gate_apply_kernel
from .kernels.pool_stats import _pool_stats_kernel
from .kernels.spatial_gate import (_bn_partials_reduce_kernel, _spatial_gate_bwd_kernel,
                                   _spatial_gate_bwd_stats_kernel, _spatial_gate_fwd_kernel)
from .kernels.weight_grads import _weight_grads_kernel

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ARCHS = (80, 90)
DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64"}
# Arguments specialized as divisible by 16 (pointers are aligned, plane sizes typical).
_DIVISIBLE_INTS = {"R", "K", "C", "P", "k_per_split", "c_per_split", "p_per_split",
                   "p_per_program", "c_per_program"}
# Integer arguments that are never 1 (multiples of a block of at least 8).
_NEVER_ONE = {"k_per_split", "c_per_split", "p_per_split", "p_per_program", "c_per_program",
              "CG"}


# H100 SM limits, for the theoretical occupancy column.
SM_REGS, SM_MAX_WARPS, SM_MAX_BLOCKS, SM_SMEM = 65536, 64, 32, 228 * 1024


@dataclasses.dataclass(frozen=True)
class Build:
    """One kernel configuration: kernel, the I/O dtype, constexprs, warps."""
    kernel: object
    dtype: torch.dtype
    constexprs: tuple  # sorted (name, value) pairs
    ones: tuple = ()   # integer arguments equal to 1, specialized into constants
    unaligned: tuple = ()  # "ints": the sizes of _DIVISIBLE_INTS not divisible by 16;
                           # "ptrs": every pointer off a 16-byte boundary (and the launch
                           # options of such a launch: plan.big_pass_options)

    @property
    def name(self):
        flags = ",".join(f"{k}={_short(v)}" for k, v in self.constexprs if k != "ACC_DTYPE")
        ones = f"|{','.join(self.ones)}=1" if self.ones else ""
        odd = f"|unaligned:{'+'.join(self.unaligned)}" if self.unaligned else ""
        return f"{self.kernel.fn.__name__}[{DTYPE_NAME[self.dtype]}|{flags}{ones}{odd}]"


def int_args(kernel):
    """The integer (non-pointer, non-constexpr) arguments of a kernel."""
    cx = {p.name for p in kernel.params if p.is_constexpr}
    return [n for n in kernel.arg_names
            if not n.endswith("_ptr") and n not in cx and n not in _FLOAT_ARGS]


def _with_ones(builds):
    """Builds with integer arguments equal to 1 (see the module docstring): for fp32 I/O,
    every integer that can be 1 set to 1 together and each alone; for fp64, all together.
    Per kernel, dtype and layout, the build with the most flags on (integers are used on
    the most code paths there)."""
    chosen = {}
    for b in builds:
        if b.dtype not in (torch.float32, torch.float64):
            continue
        weight, layout, _ = _traits(b)
        _keep_heaviest(chosen, (b.kernel, b.dtype, layout), weight, b)
    out = []
    for _, b in chosen.values():
        can_be_one = [n for n in int_args(b.kernel) if n not in _NEVER_ONE]
        subsets = [tuple(can_be_one)]
        if b.dtype == torch.float32:
            subsets += [(n,) for n in can_be_one if len(can_be_one) > 1]
        out += [dataclasses.replace(b, ones=s) for s in subsets]
    return out


def _unaligned(builds):
    """Builds with the alignments a launch of an unusual shape or view gets (module
    docstring), with sizes not divisible by 16 at 2-byte and 4-byte I/O: every tile and
    flag set of the kernels whose register budget depends on it
    (plan.UNALIGNED_BUDGET_KERNELS), the tiles of the other big passes with the most
    flags on; and per kernel, dtype and layout the build with the most flags on (as
    _with_ones) with the pointers unaligned, and with both."""
    every, per_tile, per_layout = [], {}, {}
    for b in builds:
        if b.ones:
            continue
        name = b.kernel.fn.__name__
        weight, layout, tile = _traits(b)
        if (name in _BIG_PASSES + ("_bwd_input_rows_kernel",)
                and b.dtype in (torch.bfloat16, torch.float32)
                and ("NUM_STAGES", 1) not in b.constexprs):
            if name in PL.UNALIGNED_BUDGET_KERNELS:
                every.append(b)
            else:
                _keep_heaviest(per_tile, (b.kernel, b.dtype, layout, tile), weight, b)
        _keep_heaviest(per_layout, (b.kernel, b.dtype, layout), weight, b)
    ints = every + [b for _, b in per_tile.values()]
    # NCHW launches over maps whose H*W is a multiple of 4 but not of 16 (plan.row_align:
    # 14x14): vector access, so other registers; per kernel, dtype and tile (F1/F2: also
    # pass and partial rows) the build with the most flags on
    row_aligned = {}
    for b in ints:
        cx = dict(b.constexprs)
        if "ROW_ALIGN" not in cx or not _positions_contiguous(cx):
            continue
        weight, _, tile = _traits(b)
        _keep_heaviest(row_aligned, (b.kernel, b.dtype, tile, cx.get("HAS_SCALE"),
                                     cx.get("HID_PARTIAL")), weight, b)
    ints += [_with_constexprs(b, ROW_ALIGN=4) for _, b in row_aligned.values()]
    return ([dataclasses.replace(b, unaligned=("ints",)) for b in ints]
            + [dataclasses.replace(b, unaligned=odd) for _, b in per_layout.values()
               for odd in (("ptrs",), ("ints", "ptrs"))])


def _positions_contiguous(cx: dict) -> bool:
    """Whether a big pass's build reads positions along its contiguous axis (NCHW)."""
    if "K_CONTIG" in cx:
        return PL.pool_positions_contiguous(cx["K_CONTIG"], cx["HAS_SCALE"])
    return cx["P_CONTIG"]


def _with_constexprs(b, **changes):
    """Build b with some constexprs changed."""
    return dataclasses.replace(b, constexprs=tuple(sorted(dict(b.constexprs, **changes).items())))


def _traits(b):
    """(weight, layout, tile) of a build: how many flags are on, its layout flag and its
    BLOCK_* tile, for picking one representative build out of several."""
    flags = tuple((k, v) for k, v in b.constexprs
                  if not k.startswith("BLOCK_") and k != "ACC_DTYPE")
    weight = sum(1 for _, v in flags if v is True or (type(v) is int and v > 0))
    layout = tuple((k, v) for k, v in flags if k in ("P_CONTIG", "K_CONTIG"))
    tile = tuple((k, v) for k, v in b.constexprs if k.startswith("BLOCK_"))
    return weight, layout, tile


def _keep_heaviest(chosen: dict, key, weight: int, build):
    """chosen[key] = (weight, build) for the build with the largest weight."""
    if key not in chosen or weight > chosen[key][0]:
        chosen[key] = (weight, build)


def _short(v):
    return str(v).replace("triton.language.", "")


_FLOAT_ARGS = {"eps_hi", "eps_lo", "mom_hi", "mom_lo"}


def _pointer_types(kernel, dtype):
    """Triton pointer type of each pointer argument: the big tensors in the I/O dtype,
    indices and counts int32, the batch counter int64, everything else (statistics,
    parameters, BatchNorm buffers, parameter gradients) in the accumulation dtype, the
    dtype of a module's parameters unless the user casts them."""
    acc = "fp64" if dtype == torch.float64 else "fp32"
    io = DTYPE_NAME[dtype]
    types = {}
    for name in kernel.arg_names:
        if not name.endswith("_ptr"):
            continue
        if name in ("x_ptr", "g_ptr", "out_ptr", "dx_ptr"):
            types[name] = "*" + io
        elif name == "nbt_ptr":
            types[name] = "*i64"
        elif "idx" in name or "cnt" in name:
            types[name] = "*i32"
        else:
            types[name] = "*" + acc
    return types


def _tile_variants(dtype):
    """(contiguous-first flag, contiguous block, other block) for every tile the launchers pick."""
    for contig in PL.CONTIG_BLOCKS:
        c_blk, o_blk = PL.tile_config(contig, dtype)
        for flag in (True, False):
            yield flag, c_blk, o_blk


def _product(options: dict):
    """Every assignment of the option lists in `options` (a dict of name -> values)."""
    combos = [{}]
    for name, values in options.items():
        combos = [dict(c, **{name: v}) for c in combos for v in values]
    return combos


def _small_map_configs(acc_dtypes):
    """(kernel, io dtype, constexprs) of the small-map kernels. Their flags select code
    paths and their tiles set register pressure, independently: with fp32 statistics
    every flag combination is built at one tile, and every tile the plan can pick with
    the most flags on (the most live values); with fp64 statistics (half tiles) every
    tile with the most flags on. BatchNorm's affine flags are built together (nn.BatchNorm2d
    has both or neither)."""
    out = []
    bs_all = PL.MERGE_BLOCKS

    def add(kernel, dtype, acc, flag_sets, heavy, tiles):
        """flag_sets at tiles[0] (fp32 only), heavy at every tile."""
        for i, tile in enumerate(tiles):
            sets = flag_sets if (i == 0 and dtype == torch.float32) else [heavy]
            for flags in sets:
                out.append((kernel, dtype, dict(flags, **tile, ACC_DTYPE=acc)))

    for dtype in acc_dtypes:
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        # phi: BLOCK_H holds the hidden units (two layers) or one block of outputs (one layer)
        for two in (True, False):
            hid_tiles = [(2 ** i, 1) for i in range(4, 11)] + [(16, 64), (1024, 8), (1024, 64)]
            tiles = hid_tiles if two else [(64, b) for b in bs_all]
            fwd, bwd = [], []
            for hidden, bs in tiles:
                block_c, block_h = PL.phi_tiles(hidden, two, bs, dtype)
                fwd.append(dict(BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_S=bs))
                block_c, block_h = PL.phi_bwd_tiles(hidden, two, min(bs, 8), dtype)
                tile = dict(BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_PB=min(bs, 8),
                            BLOCK_PS2=min(bs, 8))
                if tile not in bwd:
                    bwd.append(tile)
            add(_channel_gate_fwd_kernel, dtype, acc,
                [dict(f, TWO_LAYERS=two) for f in _product(dict(
                    POOL=[0, 1, 2], HAS_B1=[False, True], HAS_B2=[False, True] if two else [False]))],
                dict(POOL=0, HAS_B1=True, HAS_B2=two, TWO_LAYERS=two), fwd)
            if two:
                blocks_tiles = [dict(zip(("BLOCK_C", "BLOCK_H", "BLOCK_RB"),
                                         PL.phi_blocks_tiles(2 ** i, dtype)))
                                for i in range(4, 11)]
                add(_channel_gate_fwd_blocks_kernel, dtype, acc,
                    _product(dict(POOL=[0, 1, 2], HAS_B1=[False, True], HAS_B2=[False, True])),
                    dict(POOL=0, HAS_B1=True, HAS_B2=True), blocks_tiles)
                add(_channel_gate_bwd_blocks_kernel, dtype, acc,
                    [dict(POOL=p) for p in (0, 1, 2)], dict(POOL=0), blocks_tiles)
            add(_channel_gate_bwd_kernel, dtype, acc,
                [dict(f, TWO_LAYERS=two) for f in _product(dict(POOL=[0, 1, 2], HAS_GC2=[False, True]))],
                dict(POOL=0, HAS_GC2=True, TWO_LAYERS=two), bwd)
        # psi
        bn_sets = [dict(BN_MODE=0, HAS_BN_W=False, HAS_BN_B=False)] + [
            dict(BN_MODE=m, HAS_BN_W=a, HAS_BN_B=a) for m in (1, 2) for a in (False, True)]
        psi_tiles = [dict(BLOCK_P=PL.psi_block_p(bs, dtype), BLOCK_S=bs) for bs in bs_all]

        def conv(k, stencil=True):
            return dict(KSIZE=k, **PL.psi_conv(k, dtype, PL.PSI_STENCIL_MIN_POSITIONS
                                               if stencil else 1))

        def bwd_conv(k, positions=1):
            return dict(KSIZE=k, **PL.psi_bwd_conv(k, dtype, positions))
        stencil_q = PL.PSI_STENCIL_MIN_POSITIONS
        # the backward stencil's larger steps (BLOCK_Q = the program's positions), up to max
        first_q = PL.psi_bwd_conv(7, dtype, stencil_q)["BLOCK_Q"]
        larger_q = [q for q in (first_q << i for i in range(1, 8))
                    if q <= PL.PSI_BWD_STENCIL_MAX_Q]
        psi_sets = [dict(f, **bn, **conv(7, s)) for f in _product(dict(
                        POOL_ORDER=[0, 1, 2], HAS_CONV_BIAS=[False, True])) for bn in bn_sets
                    for s in (True, False)]
        psi_sets += [dict(POOL_ORDER=0, HAS_CONV_BIAS=True, BN_MODE=2, HAS_BN_W=True,
                          HAS_BN_B=True, **conv(k, s)) for k in (1, 3, 5) for s in (True, False)]
        add(_spatial_gate_fwd_kernel, dtype, acc, psi_sets,
            dict(POOL_ORDER=0, HAS_CONV_BIAS=True, BN_MODE=1, HAS_BN_W=True, HAS_BN_B=True,
                 **conv(7)), psi_tiles)
        add(_spatial_gate_bwd_stats_kernel, dtype, acc, [dict(BN_MODE=m) for m in (0, 1, 2)],
            dict(BN_MODE=2), [dict(BLOCK_P=t["BLOCK_P"], BLOCK_CS=t["BLOCK_S"]) for t in psi_tiles])
        bwd_sets = [dict(POOL_ORDER=o, BN_MODE=bn["BN_MODE"], HAS_BN_W=bn["HAS_BN_W"],
                         **bwd_conv(7, n)) for o in (0, 1, 2) for bn in bn_sets
                    for n in (1, stencil_q)]
        bwd_sets += [dict(POOL_ORDER=0, BN_MODE=2, HAS_BN_W=True, **bwd_conv(k, n))
                     for k in (1, 3, 5) for n in (1, stencil_q)]
        heavy_bwd = dict(POOL_ORDER=0, BN_MODE=2, HAS_BN_W=True)
        add(_spatial_gate_bwd_kernel, dtype, acc, bwd_sets, dict(heavy_bwd, **bwd_conv(7)),
            [dict(BLOCK_PARTS=PL.bn_parts_block(dtype))])
        for n in larger_q:  # every step size of the stencil, most values live
            add(_spatial_gate_bwd_kernel, dtype, acc, [dict(heavy_bwd, **bwd_conv(7, n))],
                dict(heavy_bwd, **bwd_conv(7, n)), [dict(BLOCK_PARTS=PL.bn_parts_block(dtype))])
        add(_bn_partials_reduce_kernel, dtype, acc, [dict(MOMENTS=False), dict(MOMENTS=True)],
            dict(MOMENTS=True), [{}])
        # parameter gradients: the MLP part and the conv/BatchNorm part run in separate
        # programs, so each part's flags are built with the other part's flags all on
        mlp = [f for f in _product(dict(POOL=[0, 1, 2], TWO_LAYERS=[False, True],
                                        HAS_B1=[False, True], HAS_B2=[False, True]))
               if f["TWO_LAYERS"] or not f["HAS_B2"]]
        conv_on = dict(HAS_CONV=True, HAS_CONV_BIAS=True, HAS_BN_W=True, HAS_BN_B=True)
        convs = [dict(HAS_CONV=False, HAS_CONV_BIAS=False, HAS_BN_W=False, HAS_BN_B=False)] + [
            dict(HAS_CONV=True, HAS_CONV_BIAS=b, HAS_BN_W=a, HAS_BN_B=a)
            for b in (False, True) for a in (False, True)]
        heavy_mlp = dict(POOL=0, TWO_LAYERS=True, HAS_B1=True, HAS_B2=True)
        add(_weight_grads_kernel, dtype, acc,
            [dict(f, **conv_on) for f in mlp] + [dict(heavy_mlp, **c) for c in convs[:-1]],
            dict(heavy_mlp, **conv_on),
            [dict(BLOCK_R=t, BLOCK_K=t, BLOCK_N=PL.weight_grad_samples(dtype, t),
                  BLOCK_G=PL.CONV_GRAD_BLOCK, BLOCK_NR=PL.weight_grad_rows(dtype))
             for t in PL.WEIGHT_TILES])
    return out


def _hidden_tiles(block_c: int, dtype, big_tiles: int, every: bool):
    """(BLOCK_H, HID_LOOP) of the hidden tiles a big pass with block_c channels per program
    can take for the channel MLP's partial rows (plan.hidden_block): alone (covering the
    hidden units) and the largest also in a loop; every tile when `every` with fp32 I/O
    (F1: ptxas once held smaller tiles to fewer registers than the largest, and spilled),
    else the largest."""
    block_hs = sorted({PL.hidden_block(2 ** i, block_c, dtype, big_tiles) for i in range(11)})
    if dtype != torch.float32 or not every:
        block_hs = block_hs[-1:]
    return [(b, False) for b in block_hs] + [(block_hs[-1], True)]


def launch_configs(dtypes=DTYPES):
    """Every (kernel, dtype, constexprs) the launchers in launchers.py can launch (see
    _small_map_configs for how the small-map kernels' variants are covered)."""
    builds = []

    def add(kernel, dtype, **cx):
        cx["ACC_DTYPE"] = tl.float64 if dtype == torch.float64 else tl.float32
        cx.setdefault("ROW_ALIGN", 1)  # every big pass: no hint (plan.row_align, _unaligned)
        builds.append(Build(kernel, dtype, tuple(sorted(cx.items()))))

    for dtype in dtypes:
        # the looped passes at both pipelining depths (plan.loop_stages); the unpipelined
        # loop at fp32 I/O only (the same loop without cp.async)
        stages = (PL.STAGES.value, 1) if dtype == torch.float32 else (PL.STAGES.value,)
        for k_contig, contig, other in _tile_variants(dtype):
            block_k, block_r = (contig, other) if k_contig else (other, contig)
            # F2 (scaled), F1, F1 with the channel MLP's layer-1 partials (two-branch pool
            # mode at every hidden tile; the others with fp32 I/O, looping)
            hid_tiles = _hidden_tiles(block_r, dtype, 2, every=True)
            variants = [(True, False, 0, 1, False), (False, False, 0, 1, False)] + [
                (False, True, 0, block_h, loop) for block_h, loop in hid_tiles] + [
                (False, True, pool, *hid_tiles[-1])
                for pool in ((1, 2) if dtype == torch.float32 else ())]
            for has_scale, hid_partial, pool, block_h, loop in variants:
                for st, tail in itertools.product(stages, (True, False)):
                    add(_pool_stats_kernel, dtype, HAS_SCALE=has_scale, HID_PARTIAL=hid_partial,
                        POOL=pool, K_CONTIG=k_contig, BLOCK_R=block_r, BLOCK_K=block_k,
                        HAS_TAIL=tail, NUM_STAGES=st, BLOCK_H=block_h, HID_LOOP=loop)
        for p_contig, contig, other in _tile_variants(dtype):
            block_c, block_p = (other, contig) if p_contig else (contig, other)
            blk = dict(P_CONTIG=p_contig, BLOCK_C=block_c, BLOCK_P=block_p)
            for sa_mode in (0, 1, 2):
                for affine, track in ([(False, False)] if sa_mode < 2 else
                                      [(False, False), (True, True)]):
                    for loop in (False, True):
                        add(_gate_apply_kernel, dtype, SA_MODE=sa_mode, HAS_BN_W=affine,
                            HAS_BN_B=affine, TRACK=track, HAS_NBT=track, LOOP=loop,
                            BLOCK_PARTS=PL.bn_parts_block(dtype), **blk)
            for has_sa in (False, True):
                for st in stages:
                    add(_bwd_gate_sums_kernel, dtype, HAS_SA=has_sa, NUM_STAGES=st, **blk)
                for amax in (False, True):
                    for loop in (False, True):
                        add(_bwd_input_kernel, dtype, HAS_SA=has_sa, AMAX=amax, LOOP=loop, **blk)
            # B2, and B2 with dlogits and the W2^T dlogits partials (ties: AMAX; B1's
            # partial rows merged 8 at a time)
            b2_tiles = _hidden_tiles(block_c, dtype, 1, every=False)
            b2_variants = [(amax, False, 1, 1, False) for amax in (False, True)] + [
                (True, True, 8, block_h, loop) for block_h, loop in b2_tiles]
            for amax, dr_partial, block_pb, block_h, loop in b2_variants:
                for st in stages:
                    add(_bwd_spatial_pool_kernel, dtype, AMAX=amax, DR_PARTIAL=dr_partial,
                        NUM_STAGES=st, BLOCK_PB=block_pb, BLOCK_H=block_h, HID_LOOP=loop, **blk)
        # B3 by rows (plan.b3_rows: a warp of 16-byte vectors, or a narrower power of 2
        # down to 32; each step count)
        widths = [w for w in (32, 64, 128, 256, 512) if w <= PL.b3_rows_widest(dtype)]
        for p_contig, has_sa, amax, steps, block_k in itertools.product(
                (True, False), (False, True), (False, True), PL.B3_ROWS_STEPS, widths):
            add(_bwd_input_rows_kernel, dtype, HAS_SA=has_sa, AMAX=amax, P_CONTIG=p_contig,
                BLOCK_K=block_k, STEPS=steps)
    acc_dtypes = sorted({torch.float32 if d != torch.float64 else d for d in dtypes}, key=str)
    for kernel, dtype, cx in _small_map_configs(acc_dtypes):
        builds.append(Build(kernel, dtype, tuple(sorted(cx.items()))))
    builds = _fp16_representatives(builds)
    return builds + _with_ones(builds) + _unaligned(builds)


def _fp16_representatives(builds):
    """builds with the fp16 ones cut to one per kernel, layout and tile (the one with the
    most flags on): fp16 I/O compiles to the bf16 code but for the conversion
    instructions, and every bf16 build stays (the test suite's time goes to builds)."""
    chosen, out = {}, []
    for b in builds:
        if b.dtype != torch.float16:
            out.append(b)
            continue
        weight, layout, tile = _traits(b)
        _keep_heaviest(chosen, (b.kernel, layout, tile), weight, b)
    return out + [b for _, b in chosen.values()]


_BIG_PASSES = ("_pool_stats_kernel", "_gate_apply_kernel", "_bwd_gate_sums_kernel",
               "_bwd_spatial_pool_kernel", "_bwd_input_kernel")


def num_warps(kernel) -> int:
    """The warps the launchers give a kernel (plan.py)."""
    return num_warps_of(kernel.fn.__name__)


def num_warps_of(kernel_name: str) -> int:
    """num_warps by the kernel's name."""
    if kernel_name == "_bwd_input_rows_kernel":
        return PL.B3_ROWS_WARPS
    return PL.NUM_WARPS if kernel_name in _BIG_PASSES else PL.SMALL_NUM_WARPS


def launch_options(kernel, constexprs=None, dtype=torch.float32, unaligned=()) -> dict:
    """The compile options the launchers give a kernel (launchers.py) with these
    constexprs, this I/O dtype and these alignments (Build.unaligned)."""
    if kernel.fn.__name__ in _BIG_PASSES:
        cx = constexprs or {}
        io_bytes = torch.empty(0, dtype=dtype).element_size()
        aligned = not unaligned or not PL.unaligned_budget(
            kernel.fn.__name__, io_bytes, bool(cx.get("K_CONTIG")), bool(cx.get("HAS_SCALE")),
            bool(cx.get("P_CONTIG", True)))
        return PL.big_pass_options(bool(cx.get("HID_PARTIAL")), bool(cx.get("K_CONTIG")),
                                   io_bytes, aligned)
    if kernel.fn.__name__ == "_bwd_input_rows_kernel":
        return PL.b3_rows_options()
    if kernel.fn.__name__ == "_spatial_gate_bwd_kernel" and constexprs:
        return PL.psi_bwd_options(constexprs, constexprs["BN_MODE"])
    return {"num_warps": PL.SMALL_NUM_WARPS, "maxnreg": PL.SMALL_MAXNREG}


def compile_build(build: Build, arch: int):
    """Compile one configuration for sm_<arch>; returns triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = build.kernel
    cx = dict(build.constexprs)
    cx.update({name: 1 for name in build.ones})
    ptrs = _pointer_types(kernel, build.dtype)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in cx:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
            if "ptrs" not in build.unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE_INTS and "ints" not in build.unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=launch_options(kernel, dict(build.constexprs), build.dtype,
                                                 build.unaligned))


@functools.lru_cache(maxsize=None)
def _ptxas_path(arch):
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def ptxas_report(ptx: str, arch: int):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, spill_st, spill_ld


def resident_ctas(regs: int, smem: int, num_warps: int = PL.NUM_WARPS) -> int:
    """Programs (CTAs) of one kernel resident at once on an H100 SM, from its registers
    per thread, shared memory and warps."""
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocation granularity: 256 per warp
    by_regs = SM_REGS // (regs_per_warp * num_warps)
    by_smem = SM_SMEM // smem if smem else SM_MAX_BLOCKS
    return min(by_regs, by_smem, SM_MAX_BLOCKS, SM_MAX_WARPS // num_warps)


def occupancy(regs: int, smem: int, num_warps: int = PL.NUM_WARPS) -> float:
    """Theoretical occupancy on an H100 SM (fraction of 64 warps), from registers and smem."""
    return resident_ctas(regs, smem, num_warps) * num_warps / SM_MAX_WARPS


def build_report(build: Build, arch: int) -> dict:
    """Compile and summarize: registers, spills, shared memory, occupancy, vector accesses."""
    k = compile_build(build, arch)
    ptx = k.asm["ptx"]
    regs, spill_st, spill_ld = ptxas_report(ptx, arch)
    return dict(name=build.name, arch=arch, ones=list(build.ones),
                unaligned=list(build.unaligned), regs=regs, spill_stores=spill_st,
                spill_loads=spill_ld, smem=k.metadata.shared,
                occupancy=occupancy(regs, k.metadata.shared, num_warps(build.kernel)),
                # 16-byte loads: ld.global.v4, or 16-byte cp.async in pipelined loops
                v4_loads=len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)) + len(_CP_ASYNC_16.findall(ptx)),
                v4_stores=len(re.findall(r"st\.global(\.\w+)*\.v4", ptx)),
                cp_async=len(_CP_ASYNC.findall(ptx)),
                scalar_loads=len(re.findall(r"ld\.global(\.\w+)*\.(b|u|f)(8|16|32|64)\s", ptx)),
                i32_offsets=len(_I32_ADDPTR.findall(k.asm["ttir"]))
                + len(_I32_TILE_MUL.findall(k.asm["ttir"])))


# A software-pipelined load: cp.async from global into shared memory (ca: 4/8/16 bytes,
# cg: 16 bytes), and the 16-byte ones.
_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global")
_CP_ASYNC_16 = re.compile(r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x10|16)\b")

# A 32-bit pointer offset that could overflow: a scalar i32 (a sample or plane base) or
# a 2-D i32 tile (plane offsets r * K + k). 1-D i32 offsets added to a 64-bit row base
# are indices within one row (< C or < H*W) and cannot overflow.
_I32_ADDPTR = re.compile(r"tt\.addptr [^\n]*:[^\n]*, (tensor<\d+x\d+xi32>|i32)( |$)", re.M)
# A 32-bit multiply on a 2-D tile: a plane offset r * K computed before widening to int64.
_I32_TILE_MUL = re.compile(r"arith\.muli [^\n]*: tensor<\d+x\d+xi32>")


def _report_one(args):
    index, arch, dtypes = args  # kernels do not pickle: rebuild the list in the worker
    build = launch_configs(dtypes)[index]
    try:
        return build_report(build, arch)
    except Exception as e:  # a compile error is a result to report, not a crash
        return dict(name=build.name, arch=arch, unaligned=list(build.unaligned),
                    error=f"{type(e).__name__}: {e}")


def report_all(archs=ARCHS, dtypes=DTYPES, workers=None, shard=(0, 1)):
    """build_report for every launch configuration and arch, in parallel processes; with
    shard = (i, n), only the configurations whose index is i modulo n (the test suite
    spreads the builds over its workers this way)."""
    import multiprocessing as mp
    import os

    index, count = shard
    jobs = [(i, a, dtypes) for a in archs for i in range(len(launch_configs(dtypes)))
            if i % count == index]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_report_one(j) for j in jobs]
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_report_one, jobs, chunksize=4)


def main(argv=None):
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(description="Compile every cbam_fused kernel configuration "
                                "ahead of time (no GPU needed) and report registers and spills.")
    p.add_argument("--arch", type=int, action="append", help="80, 90 (default both)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", help="write the reports to this file")
    p.add_argument("--shard", default="0/1",
                   help="I/N: only the configurations whose index is I modulo N")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time builds need the real compiler")
    shard = tuple(int(v) for v in args.shard.split("/"))
    reports = report_all(tuple(args.arch or ARCHS), workers=args.workers, shard=shard)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    for r in reports:
        if "error" in r:
            print(f"sm_{r['arch']} {r['name']}: ERROR {r['error'][:300]}")
        else:
            print(f"sm_{r['arch']} {r['name']}: {r['regs']} regs, spills {r['spill_stores']}/"
                  f"{r['spill_loads']} B, smem {r['smem']} B, occupancy {r['occupancy']:.2f}, "
                  f"v4 ld/st {r['v4_loads']}/{r['v4_stores']}")
    bad = [r for r in reports if "error" in r or r["spill_stores"] or r["spill_loads"]]
    print(f"{len(reports)} builds, {len(bad)} with errors or spills")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
