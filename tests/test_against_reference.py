"""Forward, input gradient, every parameter gradient and BatchNorm running statistics
of the fused block against the float64 reference, per variant, dtype, layout and shape."""
import pytest
import torch
import triton
import triton.language as tl

from cuda_preconditions import ones_are_specialized
from helpers import VARIANTS, check_pair, make_module, run_pair

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]


def make_input(shape, dtype, layout, device):
    x = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_dtype_layout(variant, dtype, layout, device):
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device)
    if dtype == torch.float64:
        m = m.double()
    x = make_input(shape, dtype, layout, device)
    res = run_pair(m, x)
    out = res["fused"]["out"]
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last
                             if layout == "channels_last" else torch.contiguous_format)
    assert res["fused"]["dx"].dtype == dtype
    check_pair(res, dtype, shape, f"{variant}/{dtype}/{layout}")


@triton.jit
def _to_method_probe_kernel(out_ptr, K):
    tl.store(out_ptr, 1.0 / K.to(tl.float32))  # the pattern that broke on the GPU


@triton.jit
def _cast_probe_kernel(out_ptr, K):
    tl.store(out_ptr, 1.0 / tl.cast(K, tl.float32))  # the pattern the kernels use


def test_integers_equal_to_one_arrive_as_constants(device):
    """The small-dimension cases below exercise what the compiler does with an integer
    argument equal to 1 (a compile-time constant, a plain int in the kernel): on the
    CPU the interpreter is made to do the same, so a kernel that calls a tensor method
    on such an argument fails here as it fails to compile on a GPU."""
    out = torch.zeros(1, device=device)
    if device.type == "cpu":
        assert ones_are_specialized()
    with pytest.raises(Exception, match="has no attribute 'to'"):
        _to_method_probe_kernel[(1,)](out, 1)
    _to_method_probe_kernel[(1,)](out, 4)  # a runtime integer has the method
    assert float(out) == 0.25
    _cast_probe_kernel[(1,)](out, 1)
    assert float(out) == 1.0


SHAPES = [(n, c, h, w) for n in (1, 3) for c in (1, 3, 17, 64)
          for (h, w) in ((1, 1), (7, 7), (5, 9), (13, 17))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["official", "timm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape, variant, layout, device):
    N, C, H, W = shape
    # BatchNorm in training mode needs more than one value per channel.
    m = make_module(variant, C, device, train=N * H * W > 1)
    x = make_input(shape, torch.float32, layout, device)
    check_pair(run_pair(m, x), torch.float32, shape, f"{variant}/{shape}/{layout}")


BN_VARIANTS = [v for v, opts in VARIANTS.items()
               if opts.get("spatial_pool", "max,mean") is not None and opts.get("spatial_bn", True)]


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["bn_trainable", "bn_frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", BN_VARIANTS)
def test_eval_mode_with_gradients(variant, layout, frozen_bn, device):
    """Fine-tuning with the spatial BatchNorm in eval mode (running statistics), gradients
    on: the most common way a pretrained detector is trained. On the CPU, run_pair
    raises where CUDA's kernels would reject an argument (tests/cuda_preconditions.py)."""
    assert BN_VARIANTS == ["official", "timm", "timm_light"]
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device, train=False)
    if frozen_bn:
        m.SpatialGate.spatial.bn.requires_grad_(False)
    res = run_pair(m, make_input(shape, torch.float32, layout, device))
    check_pair(res, torch.float32, shape, f"eval {variant} {layout}")
    bn_grad = res["fused"]["grads"]["SpatialGate.spatial.bn.weight"]
    assert (bn_grad is None) == frozen_bn


@pytest.mark.parametrize("variant", ["ultralytics", "no_spatial"])
def test_eval_mode_without_batchnorm(variant, device):
    shape = (3, 17, 5, 9)
    m = make_module(variant, shape[1], device, train=False)
    check_pair(run_pair(m, make_input(shape, torch.float32, "nchw", device)),
               torch.float32, shape, f"eval {variant}")


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_kernel_sizes(kernel_size, device):
    shape = (2, 20, 6, 7)
    m = make_module("timm", shape[1], device, kernel_size=kernel_size)
    check_pair(run_pair(m, make_input(shape, torch.float32, "nchw", device)),
               torch.float32, shape, f"k={kernel_size}")


@pytest.mark.parametrize("variant", ["official", "timm"])
def test_ties(variant, device):
    """Whole zero channels and repeated values (as after a ReLU): first-index vs split ties."""
    shape = (2, 16, 6, 6)
    x = torch.randn(shape, dtype=torch.float64).relu()
    x[:, ::3] = 0.0                       # channels that are all zero: ties over every position
    x[:, 1, :3] = x[:, 1, 3:]             # a repeated channel max
    x = torch.round(x * 4) / 4            # coarse values: many ties across channels
    m = make_module(variant, shape[1], device)
    check_pair(run_pair(m, x.float().to(device)), torch.float32, shape, f"ties {variant}")



# (variant, shape, conv kernel size): row blocks of one row (halo wider than a block) and
# of two rows with a shorter last block (N = 60, H = 7)
GPU_PLAN_CASES = [("official", (2, 24, 13, 11), 7), ("timm", (1, 40, 9, 20), 7),
                  ("timm_light", (3, 17, 6, 5), 3), ("official", (60, 4, 7, 3), 7)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GPU_PLAN_CASES,
                         ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-k{c[2]}")
def test_plan_of_a_large_gpu(case, layout, device, monkeypatch):
    """The plan an H100/H200 gets (132 SMs): the spatial maps split into row blocks whose
    conv halos cross block edges, B2 split over positions, one BatchNorm row per
    spatial-map program."""
    from cbam_fused import plan as plan_module

    variant, shape, kernel_size = case
    N, C, H, W = shape
    monkeypatch.setattr(plan_module, "INTERPRETER_SM_COUNT", 132)
    rows = plan_module.psi_rows(N, H, W, 132)
    assert rows < H                                   # several row blocks per sample
    assert rows == (2 if N == 60 else 1)
    b2_splits, _ = plan_module.position_split(N, C, H * W, layout == "nchw", torch.float32, 132)
    assert b2_splits > 1 or H * W <= 32
    # small weights on a large GPU: 16 x 16 weight-gradient tiles (the one-SM plan of the
    # other tests takes 32 x 32 ones)
    assert plan_module.weight_tile(C, True, C, 132) == plan_module.WEIGHT_TILES[0]
    assert plan_module.weight_tile(C, True, C, 1) == plan_module.WEIGHT_TILES[-1]
    m = make_module(variant, C, device, kernel_size=kernel_size)
    x = make_input(shape, torch.float32, layout, device)
    check_pair(run_pair(m, x), torch.float32, shape, f"132 SMs {variant}/{shape}/{layout}")


# (variant, kernel size, dtype, most positions of a backward stencil program): the
# spatial maps' convs as stencils and as tap gathers (plan.psi_conv, plan.psi_bwd_conv)
# on a 23 x 19 map on one SM: one program of 437 positions per sample (the forward's
# stencil in two steps with a short last one, the backward's in one of 512), or, at
# most 256, two of 12 and 11 rows (the halo crosses programs; backward steps of 256);
# gathers: 14 or 8 steps. Every conv input mode; kernel sizes 1 (the backward stencil's
# first window row alone) to 7 (that row, then pairs of rows).
PSI_CONV_CASES = [("official", 7, torch.float32, 256), ("timm", 7, torch.bfloat16, 512),
                  ("timm_light", 3, torch.float32, 256), ("official", 5, torch.float64, 512),
                  ("timm", 1, torch.float32, 256)]


@pytest.mark.parametrize("stencil", [True, False], ids=["stencil", "gathers"])
@pytest.mark.parametrize("case", PSI_CONV_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}")
def test_spatial_conv_paths(case, stencil, device, monkeypatch):
    from cbam_fused import plan as plan_module

    variant, kernel_size, dtype, bwd_most = case
    shape = (2, 12, 23, 19)
    monkeypatch.setattr(plan_module, "PSI_STENCIL_MIN_POSITIONS", 1 if stencil else 10 ** 9)
    monkeypatch.setattr(plan_module, "PSI_BWD_STENCIL_MAX_Q", bwd_most)
    chosen = {"psi_conv": [], "psi_bwd_conv": []}
    for name in chosen:
        real = getattr(plan_module, name)

        def spy(*args, real=real, name=name):
            cx = real(*args)
            chosen[name].append((cx["STENCIL"], cx["BLOCK_Q"]))
            return cx
        monkeypatch.setattr(plan_module, name, spy)
    # plan again under these thresholds
    cached = (plan_module.block_plan, plan_module.BlockPlan.psi_conv,
              plan_module.BlockPlan.psi_bwd_conv)
    for c in cached:
        c.cache_clear()
    try:
        m = make_module(variant, shape[1], device, kernel_size=kernel_size)
        check_pair(run_pair(m, make_input(shape, dtype, "nchw", device)), dtype, shape,
                   f"psi conv {'stencil' if stencil else 'gathers'} {variant} k={kernel_size}")
    finally:
        for c in cached:
            c.cache_clear()
    assert chosen["psi_conv"] and all(c[0] == stencil for c in chosen["psi_conv"])
    assert chosen["psi_bwd_conv"] and all(c[0] == stencil for c in chosen["psi_bwd_conv"])
    if stencil:
        assert {c[1] for c in chosen["psi_bwd_conv"]} == {bwd_most}


# (shape, layout, phi_blocks, phi_bwd_blocks, hidden loop) on 132 SMs, hidden = C / 4.
# Forward: F1 unsplit as planned (NCHW), or made unsplit for the channel map (1x520x6x6
# channels_last, which F1 alone would split over H*W), forms the layer-1 partials of its
# channel blocks and the channel map runs several programs per sample; or F1 stays split
# and the channel map runs one program per sample (300 channels: too few W1 steps to be
# worth F1's extra work; 8x8 positions, as F1 reads all of 6x5 in one step of its deep
# N = 2 tile, plan.deepest_tile, and does not split). Backward: B2, made unsplit where its
# plan splits it (the channels_last cases), forms dlogits and the W2^T dlogits partials,
# and the channel map's backward runs several programs per sample. The partials loop over
# blocks of the 75-150 hidden units, or (8-channel NCHW tiles, 120 hidden units, 16-bit and
# fp32 I/O) take them in one tile.
CHANNEL_MAP_CASES = [((2, 600, 6, 5), "nchw", True, True, True),
                     ((2, 480, 9, 9), "nchw", True, True, False),
                     ((1, 520, 6, 6), "channels_last", True, True, True),
                     ((2, 300, 8, 8), "channels_last", False, True, True)]  # 16-/32-bit I/O


# every pool mode in fp32; the other precisions with the two-branch one
CHANNEL_MAP_RUNS = [(v, torch.float32) for v in ("official", "timm", "timm_light")] + [
    ("timm", torch.bfloat16), ("timm", torch.float64)]


@pytest.mark.parametrize("variant,dtype", CHANNEL_MAP_RUNS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", CHANNEL_MAP_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_channel_map_paths(case, variant, dtype, device, monkeypatch):
    """The channel-map kernels of the 132-SM plan against the reference: per channel range
    after F1's or B2's partials, and per sample after a split F1. (Per sample after a
    split B2: the other 132-SM cases, test_plan_of_a_large_gpu.)"""
    from cbam_fused import plan as plan_module

    shape, layout, phi_blocks, phi_bwd_blocks, hid_loop = case
    N, C, H, W = shape
    p_contig = layout == "nchw"
    monkeypatch.setattr(plan_module, "INTERPRETER_SM_COUNT", 132)
    plan = plan_module.block_plan(N, C, H, W, C // 4, True, True, 7, p_contig, dtype, 132)
    # the plans described above are those of 16- and 32-bit I/O; fp64's halved tiles (and
    # doubled partial rows) pick per-sample kernels in NCHW, per-range ones in channels_last
    if dtype != torch.float64:
        assert (plan.phi_blocks, plan.phi_bwd_blocks) == (phi_blocks, phi_bwd_blocks)
        split = plan_module.reduction_plan(N, C, H * W, p_contig, dtype, 132).splits
        assert plan.f1.splits == (1 if phi_blocks else split)
        assert (split > 1) == (layout == "channels_last")
        b2_split = plan_module.position_split(N, C, H * W, p_contig, dtype, 132)[0]
        assert plan.b2_splits == 1 and (b2_split > 1) == (layout == "channels_last")
        assert plan.phi_c_programs > 1 and plan.phi_c_programs * plan.phi_c_per_program >= C
        hidden = C // 4
        loops = (plan.b2_block_h < hidden, plan.f1_block_h < hidden or not phi_blocks)
        assert loops == ((True, True) if hid_loop else (False, False))
    else:
        assert (plan.phi_blocks, plan.phi_bwd_blocks) == (layout == "channels_last", True)
    m = make_module(variant, C, device)
    if dtype == torch.float64:
        m = m.double()
    x = make_input(shape, dtype, layout, device)
    check_pair(run_pair(m, x), dtype, shape, f"channel map {variant}/{shape}/{layout}")


# (shape, layout, variant, dtype) of the per-sample channel map at N = 1 on 132 SMs, hidden
# = C / 4 (plan.map_balanced_split): 300 channels, F1's 18 one-step splits cut to 6, which
# the map merges in its 8-row tile beside a wider W1 tile (13 serial round trips in F1 and
# the map, against 21); 48 channels, F1's 50 splits kept (5 against 6). One variant and
# dtype each (the interpreter's time).
PER_SAMPLE_MAP_CASES = [((1, 300, 24, 24), "channels_last", "timm", torch.float32),
                        ((1, 48, 40, 40), "channels_last", "official", torch.bfloat16)]


@pytest.mark.parametrize("case", PER_SAMPLE_MAP_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}")
def test_per_sample_channel_map(case, device, monkeypatch):
    """The per-sample channel-map forward after F1's balanced split, against the reference."""
    from cbam_fused import plan as plan_module

    shape, layout, variant, dtype = case
    N, C, H, W = shape
    monkeypatch.setattr(plan_module, "INTERPRETER_SM_COUNT", 132)
    plan = plan_module.block_plan(N, C, H, W, C // 4, True, True, 7, False, dtype, 132)
    alone = plan_module.reduction_plan(N, C, H * W, False, dtype, 132)
    assert not plan.phi_blocks
    if C == 300:
        assert (alone.splits, plan.f1.splits, plan.f1.block_s, plan.phi_block_c) == (18, 6, 8, 64)
    else:
        assert (alone.splits, plan.f1.splits, plan.f1.block_s) == (50, 50, 64)
    m = make_module(variant, C, device)
    x = make_input(shape, dtype, layout, device)
    check_pair(run_pair(m, x), dtype, shape, f"per-sample channel map {variant}/{shape}")
