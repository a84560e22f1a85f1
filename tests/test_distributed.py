"""Two processes, gloo backend, CPU tensors with the kernels in the interpreter:
DistributedDataParallel, SyncBatchNorm (converted before or after cbam_fused.convert)
and FSDP (fully_shard) with fused CBAM blocks, each against single-process training of
the eager model on the whole batch. Activation checkpointing runs in one process."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import distributed_worker
from helpers import assert_close, make_module

pytest.importorskip("timm")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["ddp_plain", "ddp_syncbn_before", "ddp_syncbn_after", "fsdp"])
def test_two_processes(case):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(distributed_worker.run, args=(2, _free_port(), case), nprocs=2, join=True)


@pytest.mark.parametrize("train", [True, False])
def test_activation_checkpointing_same_gradients(train, device):
    m = make_module("official", 16, device, train=train)
    x = torch.randn(2, 16, 6, 7, device=device, dtype=torch.float64)
    m = m.double()
    g = torch.randn_like(x)
    results = []
    for use_ckpt in (False, True):
        torch.manual_seed(0)
        xx = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        out = checkpoint(m, xx, use_reentrant=False) if use_ckpt else m(xx)
        out.backward(g)
        results.append([out.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, torch.float64, 16 * 42 * 4, "checkpointed vs plain")
