"""Synchronized batch statistics for the spatial BatchNorm (nn.SyncBatchNorm semantics).

When the spatial branch's BatchNorm is an nn.SyncBatchNorm in training mode inside an
initialized process group of more than one process, the fused block normalizes the
conv output u ([N, 1, H, W] per process) by the statistics of the whole global batch,
exactly as SyncBatchNorm would, and its backward reduces the two gradient sums across
processes. Each direction adds one small kernel (this process's per-sample rows combined
into one row: (count, mean, M2) forward, (sum ds, sum ds*uhat) backward) and one
all_gather of that row; the kernels that follow combine the gathered rows in rank order,
so the result does not depend on the backend's reduction order (deterministic). Works
with gloo on CPU as well as NCCL on GPUs. The parameter gradients stay per process, as
SyncBatchNorm's do: DistributedDataParallel averages them.
"""
from typing import Optional

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


def gather_rows(row, group):
    """(rows, world): `row` of every process of `group`, stacked in rank order."""
    world = dist.get_world_size(group)
    rows = row.new_empty(world, row.numel())
    dist.all_gather_into_tensor(rows, row.reshape(1, -1), group=group)
    return rows, world
