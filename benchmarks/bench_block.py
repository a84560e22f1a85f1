"""The block on the device: cbam_fused against eager timm, the official structure,
ultralytics and torch.compile (cases.py holds the matrix, timing.py the method).

    pytest benchmarks/bench_block.py --benchmark-only -m headline
"""
import gc

import pytest
import torch

from cases import COMPILED, matrix
from implementations import build
from timing import ROUNDS, WARMUP_ROUNDS, CaseRunner


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dynamo_graph_counts():
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("case", matrix())
def test_block(benchmark, case, bench_device, compile_budget):
    compiled = case.impl in COMPILED
    if compiled:
        compile_budget.check()
        # Dynamo caches compiled code per code object, with a recompile limit: without a
        # reset, later shapes of the same module class would silently run eagerly.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    module, fn = build(case, bench_device)
    run = CaseRunner(case, module, fn, bench_device)

    first_call_s = run.first_call_s()
    if compiled:
        compile_budget.spend(first_call_s)
    benchmark.group = case.group
    info = benchmark.extra_info
    info.update(impl=case.impl, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
                direction=case.direction, x_bytes=case.x_bytes, pass_bytes=case.pass_bytes,
                first_call_s=first_call_s)
    if compiled:
        info.update(_dynamo_graph_counts())

    benchmark.pedantic(run.timed_step, setup=run.prepare, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    info["host_us"] = run.host_us()
    info["device_us"], info["device_method"] = run.device_us()
    info["kernels"] = run.kernels_per_call()
    info["peak_MiB"] = run.peak_mib()
