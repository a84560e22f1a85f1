"""Edge cases against the float64 reference: strided views, ambiguous memory formats,
lopsided shapes, NaN and Inf placement, and 64-bit offsets."""
import pytest
import torch
import triton
import triton.language as tl

from cbam_fused.kernels.plane import _plane_offsets

from helpers import check_pair, make_module, run_pair

VIEWS = {
    "channel slice": lambda x: x[:, ::2],
    "spatial crop": lambda x: x[:, :, 1:-1, 2:],
    "batch stride": lambda x: x[::2],
    "H/W transposed": lambda x: x.transpose(2, 3),
    "NHWC permuted": lambda x: x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_strided_views(view, device):
    base = torch.randn(4, 24, 7, 9, device=device)
    x = VIEWS[view](base)
    m = make_module("official", x.shape[1], device)
    res = run_pair(m, x)
    check_pair(res, torch.float32, tuple(x.shape), f"view {view}")
    assert res["fused"]["dx"].shape == x.shape


AMBIGUOUS = [(1, 16, 5, 6), (3, 1, 5, 6), (3, 16, 1, 1), (1, 1, 4, 4), (3, 16, 1, 7)]


@pytest.mark.parametrize("shape", AMBIGUOUS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_ambiguous_memory_format(shape, fmt, device):
    """N = 1, C = 1 or H*W = 1: the tensor is both NCHW- and channels_last-contiguous."""
    x = torch.randn(shape, device=device)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    N, C, H, W = shape
    m = make_module("timm", C, device, train=N * H * W > 1)
    check_pair(run_pair(m, x), torch.float32, shape, f"ambiguous {shape} {fmt}")


@pytest.mark.parametrize("shape", [(2, 300, 2, 1), (2, 2, 40, 37), (1, 1030, 1, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_lopsided_shapes(shape, fmt, device):
    """C much larger than H*W and the reverse; more than one tile along each axis."""
    x = torch.randn(shape, device=device)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m = make_module("official", shape[1], device, reduction=16)
    check_pair(run_pair(m, x), torch.float32, shape, f"lopsided {shape} {fmt}")


def _special_input(kind, device):
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    if kind in ("nan", "mixed"):
        x[1, 2, 3, 4] = float("nan")
    if kind in ("inf", "mixed"):
        x[0, 5, 1, 1] = float("inf")
    if kind == "neg_inf":
        x[2, 0, 2, 2] = float("-inf")
    return x.float().to(device)


def _finite_entries_agree(what, a, e):
    fin = e.isfinite() & a.isfinite()
    if fin.any():
        scale = e[fin].abs().max()
        err = (a[fin] - e[fin]).abs().max()
        assert err <= 1e-4 * scale + 1e-30, f"{what}: finite entries off by {err / scale:.2e}"


@pytest.mark.parametrize("kind", ["nan", "inf", "neg_inf", "mixed"])
@pytest.mark.parametrize("variant,train", [("official", False), ("timm", False),
                                           ("ultralytics", True), ("official", True)])
def test_nan_and_inf_follow_the_reference(kind, variant, train, device):
    """NaN and Inf follow the float64 reference where the math fixes them.

    out and dx are closed formulas per element (x * ca * sa and its derivative, with
    the pooled statistics and gates as inputs), so they must be NaN / +-Inf exactly
    where the reference's are. A parameter gradient is a sum over every position, and
    where a term is 0 * Inf its NaN placement depends on how the library's kernel
    forms the sum (an im2col GEMM multiplies the padding zeros, a direct convolution
    skips them): there only the tensor's finiteness is a property of the math."""
    x = _special_input(kind, device)
    m = make_module(variant, 8, device, train=train)
    res = run_pair(m, x)
    f, r = res["fused"], res["ref"]
    for what in ("out", "dx"):
        a, e = f[what].detach().double().cpu(), r[what].detach().double().cpu()
        assert torch.equal(a.isnan(), e.isnan()), f"{kind} {what}: NaN positions differ"
        assert torch.equal(a.isposinf(), e.isposinf()), f"{kind} {what}: +Inf positions differ"
        assert torch.equal(a.isneginf(), e.isneginf()), f"{kind} {what}: -Inf positions differ"
        _finite_entries_agree(f"{kind} {what}", a, e)
    for n in r["grads"]:
        a, e = f["grads"][n].detach().double().cpu(), r["grads"][n].detach().double().cpu()
        assert bool(a.isfinite().all()) == bool(e.isfinite().all()), \
            f"{kind} grad {n}: finite {bool(a.isfinite().all())}, reference {bool(e.isfinite().all())}"
        _finite_entries_agree(f"{kind} grad {n}", a, e)


@triton.jit
def _offsets_probe_kernel(r_ptr, k_ptr, out_ptr, R, K, K_CONTIG: tl.constexpr,
                          BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offs_r = tl.load(r_ptr + i)
    offs_k = tl.load(k_ptr + i)
    off = _plane_offsets(offs_r, offs_k, R, K, K_CONTIG)  # [BLOCK, BLOCK]
    diag = tl.sum(tl.where(i[:, None] == i[None, :], off, 0), 1)
    tl.store(out_ptr + i, diag)


@pytest.mark.parametrize("k_contig", [True, False])
def test_plane_offsets_are_64_bit(k_contig, device):
    """One 64 x 256 x 384 x 384 activation has 2.4e9 > 2**31 elements. The addressing
    helper every kernel uses is run (in the interpreter, or on the GPU) on indices near
    the end of such a plane: its offsets must not wrap. The ahead-of-time test checks
    that every compiled pointer offset is 64-bit."""
    R, K = 40_000, 147_456  # 5.9e9 elements in one plane
    r = torch.tensor([0, 1, R - 1, R - 2, 12_345, R - 1, 7, 39_000], dtype=torch.int32, device=device)
    k = torch.tensor([0, K - 1, K - 1, 5, 99_999, 0, K - 3, 147_000], dtype=torch.int32, device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    _offsets_probe_kernel[(1,)](r, k, out, R, K, K_CONTIG=k_contig, BLOCK=8)
    rr, kk = r.long().cpu(), k.long().cpu()
    want = rr * K + kk if k_contig else kk * R + rr
    assert torch.equal(out.cpu(), want)
    assert int(want.max()) > 2 ** 32
