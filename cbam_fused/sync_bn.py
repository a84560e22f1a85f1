"""Synchronized batch statistics for the spatial BatchNorm (nn.SyncBatchNorm semantics).

When the spatial branch's BatchNorm is an nn.SyncBatchNorm in training mode inside an
initialized process group of more than one process, the fused block normalizes the
conv output u ([N, 1, H, W] per process) by the statistics of the whole global batch,
exactly as SyncBatchNorm would, and its backward reduces the two gradient sums across
processes. Collectives are all_gather plus a sum in rank order, so results do not depend
on the reduction order of the backend (deterministic), and they work with gloo on CPU
as well as NCCL on GPUs. Only tiny tensors travel: 3 numbers per process forward, 2
backward.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def sync_group(bn: Optional[nn.Module]):
    """The process group to synchronize over, or None when statistics stay local:
    not a SyncBatchNorm, eval mode, no initialized process group, or one process."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """t from every process of group, stacked in rank order: [world, *t.shape]."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def global_mean_var(u: torch.Tensor, group):
    """(mean, biased var, global count) of u over dims (0, 2, 3) and every process.

    Each process contributes its count, sum and sum of squared deviations from its own
    mean (Chan's parallel combination), which stays accurate when the mean is large.
    """
    dims = (0, 2, 3)
    n_local = u.numel() // u.shape[1]
    var_l, mean_l = torch.var_mean(u, dim=dims, correction=0)
    mine = torch.stack([torch.full_like(mean_l, n_local), mean_l, var_l * n_local])
    stats = _gather(mine, group)                    # [world, 3, channels]
    counts, means, m2 = stats[:, 0], stats[:, 1], stats[:, 2]
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (m2 + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


def sync_bn_forward(u, gamma, beta, eps: float, group):
    """Normalize u with global batch statistics; returns (s, uhat, invstd, mean, var, count)."""
    mean, var, count = global_mean_var(u, group)
    invstd = torch.rsqrt(var + eps)
    uhat = (u - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    s = uhat if gamma is None else uhat * gamma.view(1, -1, 1, 1)
    if beta is not None:
        s = s + beta.view(1, -1, 1, 1)
    return s, uhat, invstd, mean, var, count


def sync_bn_backward(ds, uhat, invstd, gamma, count, group):
    """(du, local dgamma, local dbeta). The parameter gradients stay per process, as
    SyncBatchNorm's do: DistributedDataParallel averages them."""
    dims = (0, 2, 3)
    dbeta = ds.sum(dims)
    dgamma = (ds * uhat).sum(dims)
    sums = _gather(torch.stack([dbeta, dgamma]), group).sum(0)
    mean_dy, mean_dy_uhat = sums[0] / count, sums[1] / count
    scale = invstd if gamma is None else invstd * gamma
    du = (ds - mean_dy.view(1, -1, 1, 1) - uhat * mean_dy_uhat.view(1, -1, 1, 1)) \
        * scale.view(1, -1, 1, 1)
    return du, dgamma, dbeta
