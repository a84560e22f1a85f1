"""The big-pass launchers called directly: every statistic and backward sum against torch,
including the split-reduction partials a GPU launch makes (their fixed-order merge runs in
the small-map kernels: tests/test_launches.py checks it end to end)."""
import pytest
import torch
import torch.nn.functional as F

import cbam_fused.launchers as L
from cbam_fused.plan import row_align
from cbam_fused.spec import CBAMWeights

from helpers import assert_close


def _first_argmax(t, dim):
    """Index of the first maximum along dim (torch.max semantics), NaN winning."""
    return t.max(dim).indices


def _split_stats(t, k_per_split, S, dim):
    """Per split of `dim` (k_per_split columns each): sum, max, first argmax, tie count."""
    out = []
    for s in range(S):
        part = t.narrow(dim, s * k_per_split, min(k_per_split, t.shape[dim] - s * k_per_split))
        m = part.amax(dim)
        out.append((part.sum(dim), m, _first_argmax(part, dim) + s * k_per_split,
                    (part == m.unsqueeze(dim)).sum(dim)))
    return [torch.stack([o[i] for o in out], 1) for i in range(4)]


def _assert_sums_close(s, want, length, what):
    """Sums that hold -inf where the reference does, and are close elsewhere."""
    s = s.cpu().double()
    assert torch.equal(s.isneginf(), want.isneginf()), f"{what}: -inf entries differ"
    finite = want.isfinite()
    assert_close(s[finite], want[finite], torch.float32, length, what)


@pytest.mark.parametrize("hw", [(9, 17), (14, 14)], ids=["9x17", "14x14"])
@pytest.mark.parametrize("splits", [1, 3, 64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_and_spatial_stats(splits, layout, hw, device):
    """F1 and F2 on their own: the partial statistics of each split (the merge runs in
    the small-map kernels and is checked end to end in test_launches.py). A 14x14 map's
    196 positions are a multiple of 4, not of 16: in NCHW its rows are read with the
    ROW_ALIGN hint (plan.row_align), the last tile of a split masked 4 columns at a time."""
    N, C, (H, W) = 2, 40, hw
    assert row_align(H * W, True) == (4 if hw == (14, 14) else 1)
    x = torch.randn(N, C, H, W, device=device)
    x[0, 3, 2, :5] = 7.0     # a tied channel max (5 positions)
    x[1, :, 4, 4] = 9.0      # a tied spatial max (every channel of one position)
    x[0, 6] = float("-inf")  # a channel whose max is -inf: first index, every position ties
    x[0, :, 7, 2] = float("-inf")  # the same for one position's channels
    p_contig = layout == "nchw"
    if not p_contig:
        x = x.to(memory_format=torch.channels_last)
    xf = x.double().cpu().reshape(N, C, H * W)

    (s, m, i, c), red = L.channel_stats_partials(x, p_contig, splits=splits)
    assert red.splits == s.shape[1] and (splits == 1) == (red.splits == 1)
    want = _split_stats(xf, red.k_per_split, red.splits, 2)
    _assert_sums_close(s, want[0], H * W, "channel sum")
    assert torch.equal(m.cpu().double(), want[1])
    assert torch.equal(i.cpu().long(), want[2])
    assert torch.equal(c.cpu().long(), want[3])
    assert int(c[0, :, 3][m[0, :, 3] == 7.0].sum()) == 5  # the tie, however it is split

    ca = torch.rand(N, C, device=device) + 0.5
    ca[1] = 1.0  # keep the spatial tie exact after scaling
    y = xf * ca.double().cpu()[:, :, None]
    (s, m, i, c), red = L.spatial_stats_partials(x, ca, p_contig, splits=splits)
    want = _split_stats(y, red.k_per_split, red.splits, 1)
    _assert_sums_close(s, want[0], C, "spatial sum")
    yf = (x.float().cpu().reshape(N, C, H * W) * ca.cpu()[:, :, None]).double()  # fp32 products
    want = _split_stats(yf, red.k_per_split, red.splits, 1)
    assert torch.equal(m.cpu().double(), want[1])
    assert torch.equal(i.cpu().long(), want[2])
    assert torch.equal(c.cpu().long(), want[3])
    assert int(c[1, :, 4 * W + 4].sum()) == C


def test_stats_nan_propagates(device):
    x = torch.randn(1, 4, 3, 5, device=device)
    x[0, 1, 1, 2] = float("nan")
    x[0, 1, 2, 0] = float("nan")
    (s, m, i, c), _ = L.channel_stats_partials(x, True, splits=1)
    s, m, i = s[:, 0], m[:, 0], i[:, 0]
    assert torch.isnan(m[0, 1]) and torch.isnan(s[0, 1])
    assert int(i[0, 1]) == 1 * 5 + 2  # the first NaN, as torch.max
    assert not torch.isnan(m[0, [0, 2, 3]]).any()


# Maps of 66 positions (no row hint) and of 100 (a multiple of 4, not of 16: NCHW rows
# start on 16-byte boundaries at fp32, plan.row_align; the masks compare 4 positions at a
# time, plane._below)
HINT_MAPS = pytest.mark.parametrize("hw", [(6, 11), (10, 10)], ids=["6x11", "10x10"])


@HINT_MAPS
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("has_sa", [True, False])
def test_bwd_gate_sums(splits, layout, has_sa, hw, device):
    N, C, (H, W) = 2, 70, hw
    assert row_align(H * W, True) == (4 if hw == (10, 10) else 1)
    p_contig = layout == "nchw"
    x = torch.randn(N, C, H, W, device=device)
    g = torch.randn(N, C, H, W, device=device)
    if not p_contig:
        x, g = (t.to(memory_format=torch.channels_last) for t in (x, g))
    ca = torch.rand(N, C, device=device)
    sa = torch.rand(N, H * W, device=device) if has_sa else None
    gs, gc = L.bwd_gate_sums(g, x, ca, sa, p_contig, splits=splits)
    gx = (g.double() * x.double()).cpu().reshape(N, C, H * W)
    sa_ref = sa.double().cpu()[:, None, :] if has_sa else 1.0
    # partial rows (over position blocks / channel splits), summed here in float64
    assert_close(gc.double().sum(1), (gx * sa_ref).sum(2), torch.float32, H * W, "Gc1")
    if has_sa:
        assert gs.shape[1] <= splits
        assert_close(gs.double().sum(1), (gx * ca.double().cpu()[:, :, None]).sum(1),
                     torch.float32, C, "Gs")
    else:
        assert gs is None


# B3's two kernels (plan.b3_rows): by tiles; by rows with 8 and with 2 rows per program,
# over two blocks of the contiguous axis (160 = 128 + 32 positions in NCHW, 144 = 128 + 16
# channels in channels_last: 16-byte aligned rows) and a short last group of rows (144
# channels in NCHW, 160 positions in channels_last: not multiples of 8); by rows over a
# narrow axis whose rows are not 16-byte aligned (49 of 64 lanes: a 7x7 map in NCHW, 49
# channels in channels_last).
B3_PATHS = {"tiles": ((2, 19, 13, 11), (0, 0)), "rows8": ((2, 144, 16, 10), (128, 8)),
            "rows2": ((2, 144, 16, 10), (128, 2)), "rows_narrow": ((2, 49, 7, 7), (64, 8)),
            # 140 and 196 positions: multiples of 4, not of 16 (the NCHW row hint)
            "tiles_hint": ((2, 19, 14, 10), (0, 0)), "rows_hint": ((2, 40, 14, 14), (128, 8))}


@pytest.mark.parametrize("amax", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("b3,splits", [("tiles", 1), ("tiles", 3), ("rows8", 1), ("rows2", 1),
                                       ("rows_narrow", 1), ("tiles_hint", 1), ("tiles_hint", 3),
                                       ("rows_hint", 1)])
def test_bwd_spatial_pool_and_input(amax, layout, splits, b3, device):
    """B2 with `splits` position splits; B3 by tiles with `splits` position blocks per
    program (NCHW: both blocks in one program; channels_last: 3 + 2 blocks, a loop and a
    short last one), or by rows (B3_PATHS)."""
    (N, C, H, W), rows = B3_PATHS[b3]
    P = H * W
    assert row_align(P, True) == (4 if b3.endswith("hint") else 1)
    p_contig = layout == "nchw"
    x = torch.randn(N, C, H, W, device=device)
    x[:, :, 0, 0] = 1.5          # tied spatial max at p = 0 (ca = 1 below)
    x[:, :, H - 1, W - 1] = -0.5  # ... and at the last position: in B3's last tile only
    x[:, 2, 1, :] = 3.0          # tied channel max in channel 2
    g = torch.randn_like(x)
    if not p_contig:
        x, g = (t.to(memory_format=torch.channels_last) for t in (x, g))
    ca = torch.ones(N, C, device=device)
    sa = torch.rand(N, P, device=device)
    dsmean, dsmax = torch.randn(N, P, device=device), torch.randn(N, P, device=device)
    davg, dmx = torch.randn(N, C, device=device), torch.randn(N, C, device=device)
    (_, cmax, cidx, ccnt), _ = L.channel_stats_partials(x, p_contig, splits=1)
    (_, smax, sidx, scnt), _ = L.spatial_stats_partials(x, ca, p_contig, splits=1)
    cmax, cidx, ccnt, smax, sidx, scnt = (t[:, 0] for t in (cmax, cidx, ccnt, smax, sidx, scnt))

    # torch: e_k / e_j as the gradient of max / amax
    xr = x.double().cpu().reshape(N, C, P).requires_grad_()
    y = xr * ca.double().cpu()[:, :, None]
    sm = y.amax(1) if amax else y.max(1).values
    cm = xr.amax(2) if amax else xr.max(2).values
    loss = ((y.mean(1) * dsmean.double().cpu()).sum() + (sm * dsmax.double().cpu()).sum()
            + (xr.mean(2) * davg.double().cpu()).sum() + (cm * dmx.double().cpu()).sum()
            + (y * sa.double().cpu()[:, None, :] * g.double().cpu().reshape(N, C, P)).sum())
    (ek_dsmax,) = torch.autograd.grad((sm * dsmax.double().cpu()).sum(), [y], retain_graph=True)
    (ref_dx,) = torch.autograd.grad(loss, xr)
    gc2_ref = (xr.detach() * (dsmean.double().cpu()[:, None, :] / C + ek_dsmax)).sum(2)

    gc2 = L.bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig, amax,
                             splits=splits)
    assert gc2.shape[1] == (1 if splits == 1 else (2 if p_contig else 3))
    assert_close(gc2.double().sum(1), gc2_ref, torch.float32, P, "Gc2")
    dx = L.bwd_input(g, x, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, cmax, cidx, ccnt,
                     p_contig, amax, blocks_per_program=splits, rows=rows)
    assert dx.is_contiguous(memory_format=torch.contiguous_format if p_contig else torch.channels_last)
    assert_close(dx.reshape(N, C, P), ref_dx, torch.float32, C, "dx")


@pytest.mark.parametrize("hw", [(13, 11), (14, 10)], ids=["13x11", "14x10"])
@pytest.mark.parametrize("sa_mode", [0, 1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_gate_apply(sa_mode, layout, blocks, hw, device):
    """F3 on its own, with `blocks` position blocks per program (3: one program over both
    NCHW blocks; channels_last: 3 + 2 blocks, a loop and a short last one): out = x*ca*sa,
    and in batch-statistics mode (sa_mode 2) sa from u and moment rows, the statistics
    used and the running-statistics update, against float64."""
    # H*W = 143 or 140 (a multiple of 4, the NCHW row hint): two position blocks in NCHW,
    # five in channels_last
    N, C, (H, W) = 2, 19, hw
    assert row_align(H * W, True) == (4 if hw == (14, 10) else 1)
    P, eps, momentum = H * W, 1e-5, 0.1
    p_contig = layout == "nchw"
    x = torch.randn(N, C, H, W, device=device)
    if not p_contig:
        x = x.to(memory_format=torch.channels_last)
    ca = torch.rand(N, C, device=device)
    sa = torch.rand(N, P, device=device)
    u = torch.randn(N, P, device=device) * 2 + 0.5
    xd, cad, sad, ud = (t.double().cpu() for t in (x, ca, sa, u))
    kw = {}
    if sa_mode == 1:
        kw = dict(sa=sa)
    elif sa_mode == 2:
        # (count, mean, M2) rows of three parts of u, as the spatial-map programs write them
        parts = ud.flatten().tensor_split(3)
        mom = torch.tensor([[len(q), q.mean(), ((q - q.mean()) ** 2).sum()] for q in parts],
                           dtype=torch.float32, device=device)
        bn_w, bn_b = torch.tensor([1.5], device=device), torch.tensor([-0.25], device=device)
        rm, rv = torch.zeros(1, device=device), torch.ones(1, device=device)
        nbt = torch.zeros((), dtype=torch.long, device=device)
        w = CBAMWeights(None, None, None, None, None, None, bn_w, bn_b, rm, rv, nbt, True)
        sa_out, bn_stats = torch.empty(N, P, device=device), torch.empty(3, device=device)
        kw = dict(sa=sa_out, u=u, mom=mom, num_parts=3, bn_stats=bn_stats, w=w, track=True)
        mean, var = ud.mean(), ud.var(unbiased=False)
        sad = torch.sigmoid((ud - mean) / torch.sqrt(var + eps) * 1.5 - 0.25)
    out = L.gate_apply(x, ca, p_contig, eps=eps, momentum=momentum,
                       blocks_per_program=blocks, **kw)
    ref = xd * cad[:, :, None, None]
    if sa_mode:
        ref = ref * sad.reshape(N, 1, H, W)
    assert out.stride() == x.stride()
    assert_close(out, ref, torch.float32, 1, "out")
    if sa_mode == 2:
        assert_close(sa_out, sad, torch.float32, N * P, "sa")
        assert_close(bn_stats[:2], torch.stack([mean, 1 / torch.sqrt(var + eps)]),
                     torch.float32, N * P, "bn statistics")
        assert float(bn_stats[2]) == N * P
        assert_close(rm, momentum * mean.reshape(1), torch.float32, N * P, "running mean")
        assert_close(rv, (1 - momentum) + momentum * ud.var(unbiased=True).reshape(1),
                     torch.float32, N * P, "running var")
        assert int(nbt) == 1


def test_sm_count_of_tensor_matches_its_device(device):
    """plan_for and the launchers read the SM count from the tensor (sm_count_of, no
    device object); it must be the count of the tensor's device."""
    from cbam_fused.plan import sm_count, sm_count_of
    x = torch.empty(1, device=device)
    assert sm_count_of(x) == sm_count(x.device)
    assert sm_count_of(torch.empty(1, device="meta")) == sm_count(torch.device("meta"))
