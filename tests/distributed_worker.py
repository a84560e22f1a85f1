"""One process of the two-process tests in test_distributed.py (gloo, CPU, interpreter).

Every rank builds the same float64 model and the same global batch, and checks its
distributed result against single-process training of the unconverted eager model on
the whole batch (computed locally on each rank, no communication).
"""
import copy
import gc
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import cbam_fused  # noqa: E402

GLOBAL_BATCH = 8


def make_net():
    """Eager model with a timm CbamModule and an official-structure CBAM (both with a
    BatchNorm in the spatial branch)."""
    from timm.layers.cbam import CbamModule
    from official_cbam import CBAM as OfficialCBAM
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), CbamModule(16),
                        nn.Conv2d(16, 16, 3, padding=1), OfficialCBAM(16, 4),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    return net.double()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return x, y


def step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _close(a, b, what, rtol=1e-9):
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-30
    assert err <= rtol * scale, f"{what}: max err {err:.3e} (scale {scale:.3e})"


def _grads(model):
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2 DTensor shard
            g = g.full_tensor()
        out[n.replace("module.", "").replace("_fsdp_wrapped_module.", "")] = g
    return out


def run(rank, world, port, case):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        _run(rank, world, case)
        dist.barrier()  # both ranks done with every collective before the teardown
    finally:
        # DDP's reducer sits in reference cycles: collect it while its process group is
        # alive; freed at interpreter exit instead, it can abort the process in gloo's
        # teardown ("terminate called without an active exception", seen once in CI).
        gc.collect()
        dist.destroy_process_group()


def _run(rank, world, case):
    x, y = batch()
    per = GLOBAL_BATCH // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    eval_bn = case in ("ddp_plain", "fsdp")

    reference = make_net()
    if eval_bn:  # per-process BatchNorm would differ from the full batch: use running stats
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    model = copy.deepcopy(reference)
    ref_loss = step(reference, x, y)
    ref_grads = _grads(reference)

    if case == "ddp_syncbn_before":
        model = cbam_fused.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    elif case == "ddp_syncbn_after":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(cbam_fused.convert(model))
    else:
        model = cbam_fused.convert(model)
    fused = [m for m in model.modules() if isinstance(m, cbam_fused.FusedCBAMBase)]
    assert len(fused) == 2, model
    if case.startswith("ddp_syncbn"):
        assert all(isinstance(m, nn.SyncBatchNorm) for f in fused for m in f.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))

    if case == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in fused:
            fully_shard(block)
        wrapped = fully_shard(model)
    elif case.startswith("ddp_syncbn"):
        # DDP refuses SyncBatchNorm in CPU modules ("only work with GPU modules"); on CPU
        # the gradient averaging DDP would do is done by hand after backward.
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    loss = step(wrapped, xs, ys)
    if case.startswith("ddp_syncbn"):
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    dist.all_reduce(loss)
    _close(loss / world, ref_loss, f"{case} loss")
    grads = _grads(wrapped)
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    for n, g in grads.items():
        _close(g, ref_grads[n], f"{case} rank {rank} grad {n}")
    if case.startswith("ddp_syncbn"):
        _check_sync_launches(fused[0], per)
    ref_buffers = dict(reference.named_buffers())
    for n, b in model.named_buffers():
        n = n.replace("module.", "")
        if "running" in n:
            _close(b, ref_buffers[n], f"{case} rank {rank} {n}")


def _check_sync_launches(block, per):
    """SyncBatchNorm adds at most 2 launches per direction to the block's 5 and 7 (one
    small kernel and one all_gather each way). Run on a copy: the buffers stay as trained."""
    from cbam_fused.accounting import TrafficCounter, count_torch_ops
    block = copy.deepcopy(block)
    x = torch.randn(per, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    with TrafficCounter() as fwd, count_torch_ops(fwd) as fwd_ops:
        out = block(x)
    g = torch.ones_like(out)
    with TrafficCounter() as bwd, count_torch_ops(bwd) as bwd_ops:
        out.backward(g)
    n_fwd = len(fwd.order) + sum(fwd_ops.values())
    n_bwd = len(bwd.order) + sum(bwd_ops.values())
    assert n_fwd <= 5 + 2, (fwd.order, dict(fwd_ops))
    assert n_bwd <= 7 + 2, (bwd.order, dict(bwd_ops))
    assert "_bn_partials_reduce_kernel" in fwd.order and "_bn_partials_reduce_kernel" in bwd.order
