"""The launch plan of one fused block: every grid, split and tile size, and the workspace
layout, as a function of the shape, dtypes, layout, variant and the device's number of
multiprocessors. Computed once per key and cached, so a call does no planning work.

The multiprocessor count decides the splits of the reduced axis in F1, F2, B1 and B2
(about BIG_PASS_PROGRAMS_PER_SM programs per SM) and the row blocks of the spatial maps.
On CUDA it is the device's; elsewhere (the interpreter) it is `INTERPRETER_SM_COUNT`, 1
by default, which tests set to 132 to check the plan an H100/H200 gets.
"""
import dataclasses
import functools
import os

import torch
import triton

from .kernels.plane import MERGE_ROWS_PER_STEP, STAGES

# Tile: TILE_ELEMENTS elements of the big tensor (half for fp64, whose doubled registers
# spill otherwise), CONTIG_BLOCKS[i] of them along the contiguous dimension: the smallest
# that covers the dimension, else the largest (tile_config).
TILE_ELEMENTS = 1024
CONTIG_BLOCKS = (32, 64, 128)
NUM_WARPS = 4
SMALL_NUM_WARPS = 8   # the small-map kernels: one program per sample, so more threads each
# ... and a register budget: without .maxnreg, ptxas holds 256-thread programs to 32-64
# registers and spills a few bytes in some tiles (seen with triton 3.6 and 3.8)
SMALL_MAXNREG = 128
# F1 forming the channel MLP's partial rows: 80 registers fit every build (sm_80 spills at
# 72); with 16-bit I/O in NCHW (positions contiguous) every build fits 64, which keeps 8
# programs of 128 threads per SM instead of 6 (fp32 and channels_last builds spill there)
PARTIAL_ROWS_MAXNREG = 80
PARTIAL_ROWS_MAXNREG_16BIT_NCHW = 64
# The register budgets of an unaligned launch of these kernels (big_pass_options,
# unaligned_budget), with and without F1's partial rows.
UNALIGNED_MAXNREG = 128
UNALIGNED_PARTIAL_ROWS_MAXNREG = 160
UNALIGNED_BUDGET_KERNELS = ("_pool_stats_kernel", "_bwd_spatial_pool_kernel")
MAX_SPLITS = 64       # partial rows merged by one tile of the small-map kernels
BIG_PASS_PROGRAMS_PER_SM = 8  # the split reductions' target (8-12 fit on an SM, aot.py)
SMALL_TILE = 4096     # elements of one tile in the small-map kernels (half for fp64)
PHI_WEIGHT_TILES = 4  # weight-tile elements of the channel maps, in merge tiles
PHI_MIN_CHANNELS = 128  # channels per program of the channel-map forward after an unsplit F1
PHI_BLOCKS_MAX_C = 256  # ... and its W2 rows per step
PHI_BLOCKS_MIN_STEPS = 8  # ... used where the per-sample kernel takes this many W1 steps
MAX_HIDDEN = 1024     # hidden units of the channel MLP that one program holds
WEIGHT_TILES = (16, 32)  # rows and columns of a weight-gradient tile (plan.weight_tile)
WEIGHT_GRAD_PRODUCTS = 8192  # samples x rows x columns summed per step of a weight-gradient
                             # tile (half for fp64): 32 samples of a 16 x 16 tile
CONV_GRAD_BLOCK = 128  # conv-gradient entries summed at once (7x7, two maps, bias: 99)
# The elementwise passes (F3, B3): position blocks one program loops over, while the launch
# keeps at least EW_MIN_PROGRAMS_PER_SM programs per SM (elementwise_position_groups)
EW_BLOCKS_PER_PROGRAM = 4
EW_MIN_PROGRAMS_PER_SM = 16
# B3 by rows (kernels/backward.py _bwd_input_rows_kernel): one warp per program, one
# 16-byte vector per thread along the contiguous axis, B3_ROWS_STEPS rows of the other axis
# unrolled (fewer where the launch would give the SMs fewer programs than this many each)
B3_ROWS_WARPS = 1
B3_ROWS_STEPS = (8, 2)
B3_ROWS_MIN_PROGRAMS_PER_SM = 2
PSI_STENCIL_MIN_POSITIONS = 128  # own positions of a spatial-map program from which its
                                # convs are stencils (psi_conv, psi_bwd_conv)
PSI_BWD_STENCIL_MAX_Q = 1024  # most positions of a backward stencil program (one step)
PSI_BWD_STENCIL_MIN_Q = 256   # its fewest (4 warps): programs of 128 to 256 positions
PSI_BWD_STENCIL_PER_THREAD = 2  # its positions per thread (a warp per 64 positions)
PSI_BWD_WIDE_WARPS = 16         # ... from this many warps (1024 positions) without batch
PSI_BWD_WIDE_MAXNREG = 64       # statistics: this register budget (2 programs per SM)
BN_PARTS_BLOCK = 256  # BatchNorm partial rows combined at once (one row per psi program;
                      # half for fp64, which spills in F3 on sm_80 otherwise)

INTERPRETER_SM_COUNT = int(os.environ.get("CBAM_FUSED_SM_COUNT", "1"))


def unaligned_budget(kernel_name: str, io_bytes: int, k_contig: bool = False,
                     has_scale: bool = False, p_contig: bool = True) -> bool:
    """Whether an unaligned launch of this configuration takes the unaligned register
    budget (big_pass_options): exactly where its unaligned builds spill with the aligned
    one (aot.py, sm_80 and sm_90; the AOT test holds every unaligned build to no spills
    with the budget this gives it): F1 reducing along the contiguous axis (K_CONTIG
    without a scale: NCHW), F2 along it (channels_last) with 4-byte I/O, B2 in
    channels_last with 4-byte I/O. Elsewhere an unaligned launch keeps the aligned
    budget, which holds more programs per SM (F1 in channels_last at 56x56 splits H*W
    into 392-row parts, not a multiple of 16: 8 programs per SM at 64 registers, 7 at
    72)."""
    if kernel_name == "_pool_stats_kernel":
        return k_contig and (io_bytes >= 4 or not has_scale)
    if kernel_name == "_bwd_spatial_pool_kernel":
        return not p_contig and io_bytes >= 4
    return False


def b3_rows_options() -> dict:
    """Launch options of B3 by rows (launchers.py; aot.py builds with the same)."""
    return {"num_warps": B3_ROWS_WARPS}


def big_pass_options(partial_rows: bool = False, k_contig: bool = False,
                     io_bytes: int = 4, aligned: bool = True) -> dict:
    """Launch options of the big passes (launchers.py; aot.py builds with the same):
    NUM_WARPS, and for F1 forming the channel MLP's partial rows a register budget
    (PARTIAL_ROWS_MAXNREG, or PARTIAL_ROWS_MAXNREG_16BIT_NCHW with 16-bit I/O where the
    reduced axis is contiguous).

    aligned=False (where unaligned_budget says so, for a launch Triton specializes with a
    size not divisible by 16 or a pointer off a 16-byte boundary,
    launchers.aligned_launch): its loads are not vectorized and hold more registers: F1
    with the partial rows needs 114-140 (spills up to 120 bytes at 64):
    UNALIGNED_PARTIAL_ROWS_MAXNREG; F1, F2 and B2 a few more than ptxas gives them
    unasked (4-28 bytes of spills at 64-80; B2 at fp64 still spills at 96):
    UNALIGNED_MAXNREG."""
    if not aligned:
        return {"num_warps": NUM_WARPS, "maxnreg": UNALIGNED_PARTIAL_ROWS_MAXNREG if partial_rows
                else UNALIGNED_MAXNREG}
    if partial_rows:
        small = k_contig and io_bytes == 2
        return {"num_warps": NUM_WARPS, "maxnreg": PARTIAL_ROWS_MAXNREG_16BIT_NCHW if small
                else PARTIAL_ROWS_MAXNREG}
    return {"num_warps": NUM_WARPS}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_config(contig_extent: int, dtype: torch.dtype):
    """(contiguous block, other block) for a plane whose contiguous dimension has this extent.
    The contiguous block is the smallest of CONTIG_BLOCKS that covers the extent (a 7x7
    map's 49 positions fill 77% of a 64-wide tile, 38% of a 128-wide one), else the
    largest."""
    contig = next((b for b in CONTIG_BLOCKS if contig_extent <= b), CONTIG_BLOCKS[-1])
    elements = TILE_ELEMENTS // 2 if dtype == torch.float64 else TILE_ELEMENTS
    return contig, elements // contig


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SM_COUNT


def sm_count_of(t: torch.Tensor) -> int:
    """sm_count(t.device), without the device object (`device.type` builds a string: about
    a microsecond, twice a training step)."""
    return _cuda_sm_count(t.get_device()) if t.is_cuda else INTERPRETER_SM_COUNT


def cdiv(a: int, b: int) -> int:
    """Ceiling division (triton's cdiv is a constexpr_function: a few microseconds a call)."""
    return -(-a // b)


def row_align(P: int, p_contig: bool) -> int:
    """The ROW_ALIGN hint of the big passes over a map of P = H*W positions (kernels/
    plane.py _plane_offsets): in NCHW, 4 where P is a multiple of 4 but not of 16 (14x14
    maps: 196), so that each channel's row starts on an 8-byte (16-bit I/O) or 16-byte
    (fp32) boundary and loads along it are vectors; else 1 (Triton knows multiples of 16
    itself, and an odd P, 7x7, allows no vectors). Channels_last rows are C long,
    almost always a multiple of 16: no hint (and no builds for one, aot._unaligned)."""
    return 4 if p_contig and P % 16 and P % 4 == 0 else 1


def pool_positions_contiguous(k_contig: bool, has_scale: bool) -> bool:
    """Whether F1 (R = C, K = H*W) or F2 (scaled: R = H*W, K = C) walks a plane whose
    contiguous axis is the positions, i.e. runs in NCHW: F1 where K is contiguous, F2
    where it is not."""
    return k_contig != has_scale


def cp_blocks(C: int, P: int, p_contig: bool, dtype):
    """(BLOCK_C, BLOCK_P) of the big passes over the C x H*W plane (F3, B1, B2, B3)."""
    contig, other = tile_config(P if p_contig else C, dtype)
    return (other, contig) if p_contig else (contig, other)


def _split_axis(extent: int, block: int, other_programs: int, sms: int, splits, cap: int,
                fill: bool = False):
    """(splits, elements per split) of an axis of `extent` elements in blocks of `block`,
    reduced by programs that also span other_programs programs on the other axes (fill:
    splits_for's)."""
    blocks = cdiv(extent, block)
    if splits is None:
        splits = splits_for(other_programs, blocks, sms, fill)
    splits = max(1, min(splits, blocks, cap))
    per_split = cdiv(blocks, splits) * block
    return cdiv(extent, per_split), per_split


def b1_blocks(C: int, P: int, p_contig: bool, dtype):
    """(BLOCK_C, BLOCK_P) of B1, which writes one Gc1 partial row per position block (the
    channel map's backward merges them): the big-pass tile in NCHW; in channels_last the
    32-wide one (contiguous channels), whose 32 positions make a quarter of the partial
    rows of the 128 x 8 tile, and a longer (pipelined) loop over the channels."""
    if p_contig:
        return cp_blocks(C, P, p_contig, dtype)
    contig, other = tile_config(CONTIG_BLOCKS[0], dtype)
    return contig, other


def channel_split(N: int, C: int, P: int, p_contig: bool, dtype, sms: int, splits=None):
    """(splits, channels per split) of B1's channel axis: splits_for's programs per SM
    (filling a wave), or the requested number of splits, in whole channel blocks."""
    block_c, block_p = b1_blocks(C, P, p_contig, dtype)
    return _split_axis(C, block_c, N * cdiv(P, block_p), sms, splits, C, fill=True)


def narrowest_tile(contig: int, other: int, rows: int, N: int, sms: int):
    """(contig, other) of a split reduction along its tile's contiguous dimension: the
    narrowest of CONTIG_BLOCKS up to `contig` (same elements) whose N * cdiv(rows, other)
    programs still give BIG_PASS_PROGRAMS_PER_SM per SM. A program's fixed work (merging
    its lanes, its stores and partial rows) is paid per block of rows, and walking the
    reduced axis in more, narrower steps idles no more lanes (14x14: 196 of 224 columns
    at width 32, 196 of 256 at 128) for a quarter of the programs."""
    elements = contig * other
    narrow = next((c for c in CONTIG_BLOCKS if c <= contig and N * cdiv(rows, elements // c)
                   >= BIG_PASS_PROGRAMS_PER_SM * sms), contig)
    return narrow, elements // narrow


def deepest_tile(contig: int, other: int):
    """(contig, other) of a reduction along its tile's strided dimension whose rows give
    the SMs at most one program each even in the narrowest tile (N = 1; reduction_plan):
    that narrowest of CONTIG_BLOCKS (same elements), so that up to 4x the programs each
    walk the reduced axis in a quarter of the serial steps (1x2048x7x7 channels_last F1:
    16 programs of 7 steps of 8 positions, against 64 of 2 steps of 32). With more rows
    (64x256x56x56 channels_last) the wide tile's split programs are faster. B2 in
    channels_last (b2_blocks) likewise: unsplit where it forms the channel map's partial
    rows, 1x1024x14x14 walked 196 positions 8 at a time in 8 programs (desk model 15.0
    us) where 32 programs take 7 steps of 32."""
    elements = contig * other
    return CONTIG_BLOCKS[0], elements // CONTIG_BLOCKS[0]


def b2_blocks(N: int, C: int, P: int, p_contig: bool, dtype, sms: int):
    """(BLOCK_C, BLOCK_P) of B2, which reduces over positions: cp_blocks's, narrowed where
    the positions are contiguous (NCHW; narrowest_tile) and the wide tile walks them in
    two steps. B2 loads its per-position rows (spatial max, index, count, gradients) at
    every step, so a longer walk pays more in narrow steps than it saves in programs,
    and a map the wide tile covers at once gains nothing (desk model, 64x1024x14x14:
    16.6 us narrowed, 29.6 not; 64x512x28x28: 28.7 against 23.9; 64x2048x7x7 official:
    30.2 against 27.1); in channels_last with few channel blocks, deepest_tile's."""
    block_c, block_p = cp_blocks(C, P, p_contig, dtype)
    if p_contig and block_p < P <= 2 * block_p:
        block_p, block_c = narrowest_tile(block_p, block_c, C, N, sms)
    elif not p_contig and N * cdiv(C, CONTIG_BLOCKS[0]) <= sms:
        block_c, block_p = deepest_tile(block_c, block_p)
    return block_c, block_p


def position_split(N: int, C: int, P: int, p_contig: bool, dtype, sms: int, splits=None):
    """(splits, positions per split) of B2's position axis: splits_for's programs per SM, or
    the requested number of splits, in whole position blocks."""
    block_c, block_p = b2_blocks(N, C, P, p_contig, dtype, sms)
    return _split_axis(P, block_p, N * cdiv(C, block_c), sms, splits, MAX_SPLITS)


def elementwise_position_groups(N: int, C: int, P: int, p_contig: bool, dtype, sms: int,
                                blocks_per_program=None):
    """(groups, positions per group) of the position axis of F3 and B3, which read and
    write each element once with no reduction: a program that computes one tile waits a
    round trip for one tile. A program loops over EW_BLOCKS_PER_PROGRAM position blocks,
    else half as many, ... down to 2 (or all of them, if fewer), pipelined (the loop's
    prologue has the first STAGES - 1 tiles in flight at once), reading its channel rows
    once, where the launch keeps at least EW_MIN_PROGRAMS_PER_SM programs per SM; else
    one block. Or over the requested number of blocks."""
    block_c, block_p = cp_blocks(C, P, p_contig, dtype)
    blocks = cdiv(P, block_p)
    per = blocks_per_program
    if per is None:
        per = EW_BLOCKS_PER_PROGRAM
        # halve while half the blocks still cover the map, or the launch is too small
        while per >= 2 and (per // 2 >= blocks or N * cdiv(C, block_c) * cdiv(blocks, per)
                            < EW_MIN_PROGRAMS_PER_SM * sms):
            per //= 2
    per_program = max(1, min(per, blocks)) * block_p
    return cdiv(P, per_program), per_program


def b3_rows_widest(dtype) -> int:
    """BLOCK_K of B3 by rows over a wide axis: B3_ROWS_WARPS warps of 16-byte vectors."""
    return B3_ROWS_WARPS * 32 * (16 // torch.empty(0, dtype=dtype).element_size())


def b3_rows(N: int, C: int, P: int, p_contig: bool, dtype, sms: int):
    """(BLOCK_K, STEPS) of B3 by rows, or (0, 0) for the tile kernel (a contiguous axis
    narrower than 32). BLOCK_K: a warp of 16-byte vectors along the contiguous axis (H*W
    in NCHW, C in channels_last), or the next power of 2 of a narrower axis (7x7 NCHW: 64
    lanes, two 2-byte elements per thread, rows not 16-byte aligned). STEPS: rows of the
    other axis per program, fewer where the launch would give the SMs too few programs."""
    K, R = (P, C) if p_contig else (C, P)
    if K < 32:
        return 0, 0
    block_k = min(b3_rows_widest(dtype), triton.next_power_of_2(K))
    programs = N * cdiv(K, block_k)
    steps = next((s for s in B3_ROWS_STEPS
                  if programs * cdiv(R, s) >= B3_ROWS_MIN_PROGRAMS_PER_SM * sms),
                 B3_ROWS_STEPS[-1])
    return block_k, steps


def loop_stages(per_split: int, block: int) -> int:
    """Software-pipelining depth of a big pass's loop over per_split elements in steps of
    `block`: kernels/plane.py STAGES when the loop has at least that many steps, else 1
    (a shorter loop only pays the pipeline's prologue and shared memory)."""
    return STAGES.value if cdiv(per_split, block) >= STAGES.value else 1


def splits_for(base_programs: int, blocks: int, sms: int, fill: bool = False) -> int:
    """Splits of a reduced axis of `blocks` tiles when a launch of base_programs programs
    would leave fewer than two programs per SM (fill: fewer than BIG_PASS_PROGRAMS_PER_SM):
    then about BIG_PASS_PROGRAMS_PER_SM programs per SM, in one wave (a program keeps one
    tile load in flight per round trip, so an SM needs several to cover DRAM latency).
    F2 and B1 fill (their partial rows go to the spatial maps, which merge them in any
    case); F1 and B2 split only below two per SM, because their unsplit launch can start
    the channel map (channel_map_blocks): at 64x512x28x28 NCHW, F2's 448 programs (3.4
    per SM) walked 512 channels in 64 serial steps (desk model 30.1 us, 21.0 in 2 splits),
    B1's 31.9 us (26.7)."""
    want = BIG_PASS_PROGRAMS_PER_SM * sms
    if base_programs >= (want if fill else 2 * sms):
        return 1
    return max(1, min(want // base_programs, blocks, MAX_SPLITS))


@dataclasses.dataclass(frozen=True)
class Reduction:
    """A split reduction over the K axis of each sample's R x K plane (F1, F2)."""
    block_r: int
    block_k: int
    r_blocks: int
    splits: int
    k_per_split: int

    @functools.cached_property
    def block_s(self):
        return merge_block(self.splits)

    @functools.cached_property
    def stages(self):
        return loop_stages(self.k_per_split, self.block_k)


def reduction_plan(N, R, K, k_contig, dtype, sms, splits=None, fill=False) -> Reduction:
    """F1/F2's tile and splits: tile_config's tile, narrowed where the reduced axis K is
    the contiguous one (narrowest_tile); fill: splits_for's."""
    contig, other = tile_config(K if k_contig else R, dtype)
    if k_contig:
        contig, other = narrowest_tile(contig, other, R, N, sms)
    elif N * cdiv(R, CONTIG_BLOCKS[0]) <= sms:
        contig, other = deepest_tile(contig, other)
    block_k, block_r = (contig, other) if k_contig else (other, contig)
    r_blocks = cdiv(R, block_r)
    splits, k_per_split = _split_axis(K, block_k, N * r_blocks, sms, splits, MAX_SPLITS, fill)
    return Reduction(block_r, block_k, r_blocks, splits, k_per_split)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    N: int
    C: int
    H: int
    W: int
    hidden: int          # MLP hidden units (C for a one-layer channel map)
    two_layers: bool
    spatial: bool        # has a spatial gate
    kernel_size: int     # of the spatial gate's conv (0 without one)
    p_contig: bool
    dtype: torch.dtype
    f1: Reduction        # channel statistics: R = C, K = H*W
    f2: Reduction        # spatial statistics: R = H*W, K = C
    block_c: int         # F3, B2, B3 tiles (and B1's in NCHW)
    block_p: int
    c_blocks: int
    b1_block_c: int      # B1's tile (b1_blocks)
    b1_block_p: int
    b1_p_blocks: int     # B1: position blocks (rows of Gc1 partials)
    b1_splits: int       # B1: channel splits (rows of Gs partials)
    b1_c_per_split: int
    b2_splits: int       # B2: position splits (rows of Gc2 partials)
    b2_p_per_split: int
    ew_groups: int       # F3, B3: position groups (programs per sample and channel block)
    ew_p_per_program: int
    b3_block_k: int      # B3 by rows (b3_rows): its block of the contiguous axis (0: B3
    b3_steps: int        # by tiles, with F3's tiles and groups) and rows per program
    phi_block_c: int
    phi_block_h: int
    phi_bwd_block_c: int
    psi_block_p: int
    psi_rows: int        # rows of the map per program of the spatial-map kernels
    psi_row_blocks: int  # programs per sample of the spatial-map kernels
    bwd_block_pb: int    # B1 position-block partials merged at once
    bwd_block_cs: int    # B1 channel-split partials merged at once
    bwd_block_ps2: int   # B2 position-split partials merged at once
    wg_tiles1: int       # weight-gradient tiles of W1, W2, and their row-block counts
    wg_tiles2: int
    wg_rows1: int
    wg_rows2: int
    wg_tile: int         # rows and columns of a weight-gradient tile
    phi_blocks: bool     # unsplit F1 forms layer-1 partials; phi runs per channel range
    phi_c_programs: int  # ... its programs per sample
    phi_c_per_program: int
    phi_blocks_c: int    # ... its tiles (phi_blocks_tiles)
    phi_blocks_rb: int
    f1_block_h: int      # hidden units per step of F1's layer-1 partial
    phi_bwd_blocks: bool  # unsplit B2 forms dlogits and W2^T dlogits partials; phi's
                          # backward runs per channel range (its grid and tiles: phi_blocks')
    b2_block_h: int      # hidden units per step of B2's partial
    b2_block_c: int      # B2's tile (b2_blocks) and its channel blocks (rows of the W2^T
    b2_block_p: int      # dlogits partials)
    b2_c_blocks: int

    def __post_init__(self):
        # hashed once: the per-plan caches below (functools.lru_cache on methods) hash it
        # on every call
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self):
        return self._hash

    @property
    def P(self):
        return self.H * self.W

    @property
    def acc(self):
        return acc_dtype(self.dtype)

    @property
    def Ps(self):
        """H*W where the spatial maps exist, 0 without a spatial gate."""
        return self.P if self.spatial else 0

    # ---- workspace layouts: (name, number of elements), carved in this order; computed
    # once per plan (functools.cached_property writes the instance dict directly)
    @functools.cached_property
    def _saved(self):
        return saved_layouts(self.N, self.C, self.P, self.hidden, self.two_layers, self.spatial)

    def saved_acc_layout(self):
        return self._saved[0]

    def saved_i32_layout(self):
        return self._saved[1]

    @functools.cached_property
    def launch_handles(self):
        """The fast launch path's compiled kernels of this plan's calls, by call key
        (launch.py; filled by function.py)."""
        return {}

    @functools.cached_property
    def sizes(self):
        """Total elements of each workspace, by layout method name."""
        return {name: layout_size(getattr(self, name)()) for name in
                ("saved_acc_layout", "saved_i32_layout", "fwd_scratch_layout")}

    @functools.lru_cache(maxsize=None)
    def fwd_scratch_layout(self):
        """The forward's scratch workspace, one allocation in the accumulation dtype: the
        regions of fwd_scratch_acc_layout, then one region ("i32") that holds
        fwd_scratch_i32_layout's (read as int32: function.fused_forward). Every region of
        either layout is a multiple of 16 bytes long, so "i32" starts 16-byte aligned."""
        per_acc = self.acc.itemsize // 4  # int32 elements per accumulation element
        i32 = layout_size(self.fwd_scratch_i32_layout())
        return self.fwd_scratch_acc_layout() + (("i32", -(-i32 // per_acc)),)

    @functools.lru_cache(maxsize=None)
    def fwd_scratch_acc_layout(self):
        N, C, P = self.N, self.C, self.Ps
        return aligned((
            ("f1_sum", N * self.f1.splits * C), ("f1_max", N * self.f1.splits * C),
            ("hpart", N * self.f1.r_blocks * 2 * self.hidden * int(self.phi_blocks)),
            ("f2_sum", N * self.f2.splits * P), ("f2_max", N * self.f2.splits * P),
            ("mom", self.psi_programs * 3), ("slab", self.psi_programs * 2 * self.psi_slab)))

    @property
    def psi_programs(self):
        """Programs of the spatial-map kernels (0 without a spatial gate)."""
        return self.N * self.psi_row_blocks if self.spatial else 0

    @property
    def psi_slab(self):
        """Conv inputs held per spatial-map program: its rows and the conv's halo rows."""
        return (self.psi_rows + 2 * (self.kernel_size // 2)) * self.W if self.spatial else 0

    @functools.lru_cache(maxsize=None)
    def fwd_scratch_i32_layout(self):
        N, C, P = self.N, self.C, self.Ps
        return aligned((("f1_idx", N * self.f1.splits * C), ("f1_cnt", N * self.f1.splits * C),
                        ("f2_idx", N * self.f2.splits * P), ("f2_cnt", N * self.f2.splits * P)))

    @functools.lru_cache(maxsize=None)
    def bwd_scratch_layout(self, spatial_kernel_size, spatial_maps):
        N, C, P = self.N, self.C, self.Ps
        R = self.psi_programs
        cg = spatial_maps * spatial_kernel_size ** 2 + 1  # a conv gradient row
        conv = self.psi_bwd_conv(spatial_kernel_size)
        return aligned((
            ("gs_part", N * self.b1_splits * P), ("gc_part", N * self.b1_p_blocks * C),
            ("ds", N * P), ("dsmean", N * P), ("dsmax", N * P),
            ("bsums", R * 2), ("cgrad", R * cg),
            ("cgrad_part", R * cg * conv["GRAD_ROWS"] if conv["STENCIL"] else 0),
            ("gc2_part", N * self.b2_splits * C), ("dlog", N * C),
            ("drpart", N * self.b2_c_blocks * self.hidden * int(self.phi_bwd_blocks)),
            ("dh", N * 2 * self.hidden * int(self.two_layers)),
            ("davg", N * C), ("dmx", N * C)))


    @functools.lru_cache(maxsize=None)
    def psi_conv(self, kernel_size):
        """The forward spatial map's conv constexprs for this plan's programs (psi_conv)."""
        return psi_conv(kernel_size, self.dtype, self.psi_rows * self.W)

    @functools.lru_cache(maxsize=None)
    def psi_bwd_conv(self, kernel_size):
        """The backward spatial map's conv constexprs for this plan's programs (psi_bwd_conv)."""
        return psi_bwd_conv(kernel_size, self.dtype, self.psi_rows * self.W)

    @functools.lru_cache(maxsize=None)
    def bwd_scratch_size(self, spatial_kernel_size, spatial_maps):
        return layout_size(self.bwd_scratch_layout(spatial_kernel_size, spatial_maps))


def saved_layouts(N, C, P, hidden, two_layers, spatial):
    """The two saved workspaces (accumulation dtype, int32) kept for the backward with x:
    pooled channel statistics, the hidden rows of the MLP, the channel gate, and (with a
    spatial gate) the spatial statistics, the conv output, the spatial gate and the
    BatchNorm statistics used. Sizes are polynomials in the shape (torch.compile's fake
    implementations use them with symbolic sizes)."""
    Ps = P if spatial else 0
    acc = (("avg", N * C), ("cmax", N * C), ("ca", N * C), ("h", N * 2 * hidden * int(two_layers)),
           ("smean", N * Ps), ("smax", N * Ps), ("u", N * Ps), ("sa", N * Ps),
           ("bn_stats", 3 * int(spatial)))
    i32 = (("cidx", N * C), ("ccnt", N * C), ("sidx", N * Ps), ("scnt", N * Ps))
    return acc, i32


# Elements each workspace region is padded to: 16 bytes of fp32 / int32 (32 of fp64).
REGION_ALIGN = 4


def aligned(layout):
    """layout with a padding region ("_pad<i>") after every region whose size is not a
    multiple of REGION_ALIGN elements, so that every region starts 16-byte aligned in a
    workspace that does (torch's allocators start every tensor far more aligned).

    Triton specializes each pointer argument on its address modulo 16: an aligned region
    gets the kernels' aligned-pointer builds (aot.py) and 16-byte vector access where its
    rows allow it, whatever the shape (N = 1, C or H*W odd). For the scratch workspaces
    only: padding is never written, and the saved workspaces are outputs of the
    registered forward op, which must be deterministic to the last element (their regions
    are N*C and N*H*W rows, 16-byte aligned at every usual shape; the other alignments
    have builds of their own in aot.py)."""
    out = []
    for i, (name, size) in enumerate(layout):
        out.append((name, size))
        if size % REGION_ALIGN:
            out.append((f"_pad{i}", -size % REGION_ALIGN))
    return tuple(out)


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, v)))


# Tile of partial rows merged at once by the small-map kernels: one of three sizes, so
# that few kernel variants exist (ahead-of-time builds cover each).
MERGE_BLOCKS = (1, 8, 64)


def merge_block(count: int) -> int:
    """The smallest of MERGE_BLOCKS that holds `count` partial rows (the last one loops)."""
    return next((b for b in MERGE_BLOCKS if count <= b), MERGE_BLOCKS[-1])


def bn_parts_block(dtype) -> int:
    """BatchNorm partial rows combined at once by F3 and the spatial map's backward."""
    return BN_PARTS_BLOCK // 2 if dtype == torch.float64 else BN_PARTS_BLOCK


def weight_grad_rows(dtype) -> int:
    """Conv-gradient and BatchNorm rows (one per spatial-map program) summed per step by
    the weight-gradient kernel's last program."""
    return 2 * weight_grad_samples(dtype, WEIGHT_TILES[0])


def weight_grad_samples(dtype, tile: int) -> int:
    """Samples (rows) summed per step by a weight-gradient tile of tile x tile: the
    [samples, tile, tile] products of one step fit the same registers at every tile."""
    products = WEIGHT_GRAD_PRODUCTS // 2 if dtype == torch.float64 else WEIGHT_GRAD_PRODUCTS
    return max(1, products // (tile * tile))


def weight_grad_grid(hidden: int, two_layers: bool, C: int, tile: int):
    """(tiles of W1, tiles of W2, row blocks of W1, row blocks of W2) of the weight-gradient
    kernel with tile x tile tiles: W1 is [hidden, C] (two layers) or [C, C], W2 [C, hidden]."""
    rows1 = cdiv(hidden if two_layers else C, tile)
    rows2 = cdiv(C, tile) if two_layers else 0
    return rows1 * cdiv(C, tile), rows2 * cdiv(hidden, tile), rows1, rows2


def weight_tile(hidden: int, two_layers: bool, C: int, sms: int) -> int:
    """The largest of WEIGHT_TILES whose tiles of W1 and W2 still give every SM two
    programs (a tile loops over the samples; fewer, bigger tiles at large C keep the
    launch one wave and the interpreter fast), else the smallest."""
    for tile in reversed(WEIGHT_TILES):
        tiles1, tiles2, _, _ = weight_grad_grid(hidden, two_layers, C, tile)
        if tiles1 + tiles2 >= 2 * sms:
            return tile
    return WEIGHT_TILES[0]


def small_tile(dtype) -> int:
    return SMALL_TILE // 2 if dtype == torch.float64 else SMALL_TILE


def phi_tiles(hidden: int, two_layers: bool, block_s: int, dtype, weight_tiles=None):
    """(BLOCK_C, BLOCK_H) of the channel-map kernels: BLOCK_H holds every hidden unit
    (two layers) or one block of outputs (one layer)."""
    weight_tiles = PHI_WEIGHT_TILES if weight_tiles is None else weight_tiles
    block_h = _pow2_at_least(hidden, 16) if two_layers else 64
    # a weight tile and an MLP input tile live at once; fp64 doubles the registers. The
    # weight tile may be PHI_WEIGHT_TILES times the merge tile: fewer steps, each one
    # memory round trip
    small = small_tile(dtype) // (4 if dtype == torch.float64 else 2)
    return max(2, min(weight_tiles * small // block_h, small // block_s)), block_h


def phi_blocks_tiles(hidden: int, dtype):
    """(BLOCK_C, BLOCK_H, BLOCK_RB) of the channel-map forward after an unsplit F1: a W2
    tile as large as phi_tiles' weight tile, a tile of partial rows as large as a merge
    tile."""
    block_h = _pow2_at_least(hidden, 16)
    small = small_tile(dtype) // (4 if dtype == torch.float64 else 2)
    # at most PHI_BLOCKS_MAX_C rows of W2 at once: 512 x 16 spills on sm_90
    block_c = min(PHI_BLOCKS_MAX_C, max(2, PHI_WEIGHT_TILES * small // block_h))
    return block_c, block_h, max(1, small // block_h)


def channel_map_blocks(partial_elements: int, C: int, P: int, splits: int, unsplit_steps: int,
                       map_steps: int, map_trips: int = None) -> bool:
    """Whether a big pass next to the channel map (F1 forward, B2 backward) runs unsplit
    and multiplies its finished per-channel rows into the matching slice of the MLP's
    weights, so that the channel map runs per channel range (phi_blocks, phi_bwd_blocks):
    the partial rows of one sample (partial_elements, fp32) no larger than the sample in
    16-bit; a per-sample channel map that would walk a weight in at least
    PHI_BLOCKS_MIN_STEPS steps (map_steps; below that the big pass's extra work costs
    more than it saves); and the big pass either unsplit already or with fewer steps per
    program unsplit (unsplit_steps) than the per-sample map's serial round trips
    (map_trips: one per step unless given, bwd_map_trips)."""
    if partial_elements > C * P // 2 or map_steps < PHI_BLOCKS_MIN_STEPS:
        return False
    return splits == 1 or unsplit_steps < (map_steps if map_trips is None else map_trips)


def fwd_map_trips(red: Reduction, C: int, hidden: int, dtype) -> int:
    """Serial round trips of F1's program and then of the per-sample channel-map forward
    (_channel_gate_fwd_kernel, two layers) after it: F1's steps per split; the map's two
    walks over the channels (W1, then W2), BLOCK_C channels per step, whose weight tile
    shrinks as the merge tile of F1's partial rows (all of a channel block's splits at
    once) grows (phi_tiles)."""
    block_c = phi_tiles(hidden, True, red.block_s, dtype)[0]
    return cdiv(red.k_per_split, red.block_k) + 2 * cdiv(C, block_c)


def map_balanced_split(f1: Reduction, N: int, C: int, P: int, p_contig: bool, dtype,
                       sms: int, hidden: int) -> Reduction:
    """F1 before the per-sample channel map: its splits, or fewer (one per smaller merge
    tile, MERGE_BLOCKS) where that takes fewer serial round trips in F1 and the map
    together (fwd_map_trips). Where F1 splits to fill the SMs (small N) each split may be
    a single step, and the map then merges up to 64 partial rows per channel in narrow
    channel steps (1x256x56x56 NCHW: 25 splits of one step, then 16 map steps; 7 splits
    of four steps, then 2)."""
    best = f1
    for splits in MERGE_BLOCKS:
        if splits >= f1.splits:
            break
        red = reduction_plan(N, C, P, p_contig, dtype, sms, splits=splits)
        if fwd_map_trips(red, C, hidden, dtype) < fwd_map_trips(best, C, hidden, dtype):
            best = red
    return best


def bwd_map_trips(C: int, block_c: int, b1_p_blocks: int, block_pb: int, b2_splits: int,
                  block_ps2: int) -> int:
    """Serial round trips of the per-sample channel-map backward (_channel_gate_bwd_kernel):
    per BLOCK_C channels, B1's partial rows BLOCK_PB at a time, B2's BLOCK_PS2 at a time,
    the gate and the W2 slice, then a second walk for W1 (desk model at 1x1024x14x14
    channels_last: 112 trips, this gives 112; since then the merges take merge_step_rows
    rows a round trip)."""
    steps = cdiv(C, block_c)
    return steps * (2 + cdiv(b1_p_blocks, merge_step_rows(block_pb))
                    + cdiv(b2_splits, merge_step_rows(block_ps2)))


def merge_step_rows(block: int) -> int:
    """Partial rows a step of a merge loop of BLOCK-row tiles loads at once
    (kernels/plane.py _sum_partial_rows): MERGE_ROWS_PER_STEP, in whole tiles."""
    return block * cdiv(MERGE_ROWS_PER_STEP.value, block) if block > 1 else 1


def phi_channel_programs(N: int, C: int, sms: int):
    """(programs per sample, channels per program) of the channel-map forward after an
    unsplit F1: about one program per SM in all, each at least PHI_MIN_CHANNELS channels
    (each program re-adds the sample's partial rows)."""
    programs = max(1, min(cdiv(sms, N), cdiv(C, PHI_MIN_CHANNELS)))
    per = cdiv(cdiv(C, programs), 16) * 16
    return cdiv(C, per), per


def hidden_block(hidden: int, block_c: int, dtype, big_tiles: int = 2) -> int:
    """Hidden units per step of a big pass's partial rows of an MLP product (F1: W1 v, B2:
    W2^T dlogits) over block_c channels: the hidden units, rounded up to a power of two of
    at least 16, in a [BLOCK_H, block_c] weight tile no larger than big_tiles big tiles
    (B2, which holds more values live, takes one: two spill in some sm_80 builds)."""
    elements = TILE_ELEMENTS // 2 if dtype == torch.float64 else TILE_ELEMENTS
    return min(_pow2_at_least(hidden, 16), max(1, big_tiles * elements // block_c))


def phi_bwd_tiles(hidden: int, two_layers: bool, block_pb: int, dtype):
    """(BLOCK_C, BLOCK_H) of the channel-map backward: half the forward's weight tile
    (it keeps more rows live; ptxas spills on sm_90 with the forward's)."""
    return phi_tiles(hidden, two_layers, block_pb, dtype, PHI_WEIGHT_TILES // 2)


@functools.lru_cache(maxsize=None)
def conv_tiles(kernel_size: int, dtype):
    """(KK_PAD, BLOCK_Q) of the k x k conv's gathers in the spatial-map kernels: every tap of
    BLOCK_Q positions in one [BLOCK_Q, KK_PAD] gather."""
    kk_pad = triton.next_power_of_2(kernel_size * kernel_size)
    return kk_pad, max(16, small_tile(dtype) // 2 // kk_pad)  # two gathers live at once


def psi_conv(kernel_size: int, dtype, own_positions: int) -> dict:
    """STENCIL, KK_PAD and BLOCK_Q of the forward spatial map's k x k conv, for programs of
    own_positions positions. From PSI_STENCIL_MIN_POSITIONS on, a stencil: one position
    per thread, the taps unrolled, each a load and a multiply-add (at 7x7, 669 SASS
    instructions per 256 positions, where the gathers take 688 per 32: 5x fewer at 56x56,
    N = 64). Below, the [BLOCK_Q, KK_PAD] gathers of conv_tiles, equal in SASS at one or
    two steps, and lower in the desk model (gpumodel/), which estimates this kernel's
    instructions from the interpreter: 49 tensor operations per stencil step."""
    kk_pad, block_q = conv_tiles(kernel_size, dtype)
    stencil = own_positions >= PSI_STENCIL_MIN_POSITIONS
    return dict(STENCIL=stencil, KK_PAD=kk_pad,
                BLOCK_Q=SMALL_NUM_WARPS * 32 if stencil else block_q)


def psi_bwd_conv(kernel_size: int, dtype, own_positions: int) -> dict:
    """STENCIL, KK_PAD, BLOCK_Q and GRAD_ROWS of the backward spatial map's transposed
    conv and weight gradient, for programs of own_positions positions. A stencil from
    PSI_STENCIL_MIN_POSITIONS up to PSI_BWD_STENCIL_MAX_Q positions, in one step of
    BLOCK_Q: a warp per PSI_BWD_STENCIL_PER_THREAD * 32 positions, each summing its own
    partial weight-gradient row (GRAD_ROWS of them, added at the end of the program);
    below or above, the [BLOCK_Q, KK_PAD] gathers of conv_tiles, in steps. At 7x7,
    64x256x56x56, a program issues about 46,000 warp instructions, where the gathers
    issue 134,000."""
    kk_pad, block_q = conv_tiles(kernel_size, dtype)
    stencil = PSI_STENCIL_MIN_POSITIONS <= own_positions <= PSI_BWD_STENCIL_MAX_Q
    if stencil:
        block_q = max(PSI_BWD_STENCIL_MIN_Q, triton.next_power_of_2(own_positions))
    return dict(STENCIL=stencil, KK_PAD=kk_pad, BLOCK_Q=block_q,
                GRAD_ROWS=block_q // (32 * PSI_BWD_STENCIL_PER_THREAD) if stencil else 1)


def psi_bwd_options(conv: dict, bn_mode: int) -> dict:
    """Launch options of the backward spatial map with its conv constexprs (psi_bwd_conv)
    and BatchNorm mode: the stencil takes a warp per position group (GRAD_ROWS),
    PSI_BWD_STENCIL_PER_THREAD positions per thread; the gathers, the small maps' warps.
    A stencil of PSI_BWD_WIDE_WARPS warps or more without batch statistics fits
    PSI_BWD_WIDE_MAXNREG registers, so two programs share an SM (with batch statistics
    its builds spill there)."""
    if conv["STENCIL"] and conv["GRAD_ROWS"] >= PSI_BWD_WIDE_WARPS and bn_mode != 2:
        return dict(num_warps=conv["GRAD_ROWS"], maxnreg=PSI_BWD_WIDE_MAXNREG)
    return dict(num_warps=conv["GRAD_ROWS"] if conv["STENCIL"] else SMALL_NUM_WARPS,
                maxnreg=SMALL_MAXNREG)


def psi_rows(N: int, H: int, W: int, sms: int) -> int:
    """Rows of the map per spatial-map program: samples times row blocks fill about two
    programs per SM (each program also merges or reads its conv's halo rows), and at most
    PSI_BWD_STENCIL_MAX_Q positions a program (the backward's stencil takes them in one
    step), unless one row holds more."""
    blocks = max(1, min(H, (2 * sms) // N), cdiv(H, max(1, PSI_BWD_STENCIL_MAX_Q // W)))
    return cdiv(H, blocks)


def psi_block_p(block_s: int, dtype) -> int:
    """Positions per tile of the spatial-map kernels."""
    return max(16, min(256, small_tile(dtype) // 2 // block_s))


@functools.lru_cache(maxsize=4096)
def block_plan(N: int, C: int, H: int, W: int, hidden: int, two_layers: bool, spatial: bool,
               kernel_size: int, p_contig: bool, dtype: torch.dtype, sms: int) -> BlockPlan:
    """The plan of one block call; see the module docstring."""
    P = H * W
    f1 = reduction_plan(N, C, P, p_contig, dtype, sms)
    if two_layers and hidden > MAX_HIDDEN:
        raise ValueError(f"cbam_fused: the channel MLP's hidden size is at most {MAX_HIDDEN}, "
                         f"got {hidden}")
    phi_block_c, phi_block_h = phi_tiles(hidden, two_layers, f1.block_s, dtype)
    phi_blocks = two_layers and channel_map_blocks(
        f1.r_blocks * 2 * hidden, C, P, f1.splits, cdiv(P, f1.block_k), cdiv(C, phi_block_c))
    if phi_blocks and f1.splits > 1:
        f1 = reduction_plan(N, C, P, p_contig, dtype, sms, splits=1)
    elif two_layers and not phi_blocks:
        f1 = map_balanced_split(f1, N, C, P, p_contig, dtype, sms, hidden)
        phi_block_c, phi_block_h = phi_tiles(hidden, two_layers, f1.block_s, dtype)
    f2 = reduction_plan(N, P, C, not p_contig, dtype, sms, fill=True)
    block_c, block_p = cp_blocks(C, P, p_contig, dtype)
    c_blocks = cdiv(C, block_c)
    b1_block_c, b1_block_p = b1_blocks(C, P, p_contig, dtype)
    b1_p_blocks = cdiv(P, b1_block_p)
    b1_splits, b1_c_per_split = channel_split(N, C, P, p_contig, dtype, sms)
    b2_splits, b2_p_per_split = position_split(N, C, P, p_contig, dtype, sms)
    ew_groups, ew_p_per_program = elementwise_position_groups(N, C, P, p_contig, dtype, sms)
    b3_block_k, b3_steps = b3_rows(N, C, P, p_contig, dtype, sms)

    bwd_block_cs = merge_block(b1_splits)
    psi_block = psi_block_p(max(f2.block_s, bwd_block_cs), dtype)
    bwd_block_pb = min(8, merge_block(b1_p_blocks))  # merged 8 at a time at most (a loop)
    phi_bwd_block_c = phi_bwd_tiles(hidden, two_layers, bwd_block_pb, dtype)[0]
    b2_block_c, b2_block_p = b2_blocks(N, C, P, p_contig, dtype, sms)
    b2_c_blocks = cdiv(C, b2_block_c)
    phi_bwd_blocks = spatial and two_layers and channel_map_blocks(
        b2_c_blocks * hidden, C, P, b2_splits, cdiv(P, b2_block_p), cdiv(C, phi_bwd_block_c),
        bwd_map_trips(C, phi_bwd_block_c, b1_p_blocks, bwd_block_pb, b2_splits,
                      min(8, merge_block(b2_splits))))
    if phi_bwd_blocks and b2_splits > 1:
        b2_splits, b2_p_per_split = position_split(N, C, P, p_contig, dtype, sms, splits=1)
    wg_tile = weight_tile(hidden, two_layers, C, sms)
    tiles1, tiles2, rows1, rows2 = weight_grad_grid(hidden, two_layers, C, wg_tile)
    rows = psi_rows(N, H, W, sms)
    phi_c_programs, phi_c_per_program = phi_channel_programs(N, C, sms)
    phi_blocks_c, _, phi_blocks_rb = phi_blocks_tiles(hidden, dtype)
    return BlockPlan(N, C, H, W, hidden, two_layers, spatial, kernel_size if spatial else 0,
                     p_contig, dtype, f1, f2, block_c, block_p,
                     c_blocks, b1_block_c, b1_block_p, b1_p_blocks, b1_splits,
                     b1_c_per_split, b2_splits, b2_p_per_split,
                     ew_groups, ew_p_per_program, b3_block_k, b3_steps, phi_block_c, phi_block_h, phi_bwd_block_c,
                     psi_block, rows, cdiv(H, rows),
                     bwd_block_pb,
                     bwd_block_cs, min(8, merge_block(b2_splits)), tiles1, tiles2,
                     rows1, rows2, wg_tile, phi_blocks, phi_c_programs, phi_c_per_program,
                     phi_blocks_c, phi_blocks_rb, hidden_block(hidden, f1.block_r, dtype),
                     phi_bwd_blocks, hidden_block(hidden, b2_block_c, dtype, 1),
                     b2_block_c, b2_block_p, b2_c_blocks)


@functools.lru_cache(maxsize=4096)
def _names_sizes(layout):
    return tuple(name for name, _ in layout), [size for _, size in layout]


def carve(buf: torch.Tensor, layout):
    """Views of buf, one per (name, size) of layout, in order: {name: 1-D view}
    (one split call: a Python slice per view would cost a microsecond or two each)."""
    names, sizes = _names_sizes(layout)
    return dict(zip(names, buf.split_with_sizes(sizes)))


def layout_size(layout) -> int:
    return sum(size for _, size in layout)
