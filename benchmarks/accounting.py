"""What needs no GPU: launches, bytes moved per pass, bytes saved for backward, and the
ahead-of-time sm_90 build report, side by side for cbam_fused and eager PyTorch."""
import json
import os
import subprocess
import sys
import tempfile

import torch

from cbam_fused import CBAM, cbam_reference, plan
from cbam_fused.accounting import (TrafficCounter, count_torch_ops, saved_for_backward,
                                   tensor_bytes)

from cbam_fused.aot import DTYPE_NAME as AOT_DTYPE_NAME
from cbam_fused.aot import SM_MAX_BLOCKS as SM_MAX_CTAS
from cbam_fused.aot import num_warps_of as aot_num_warps
from cbam_fused.aot import resident_ctas
from report import print_table

BIG_TENSOR_KERNELS = ("_pool_stats_kernel", "_gate_apply_kernel", "_bwd_gate_sums_kernel",
                      "_bwd_spatial_pool_kernel", "_bwd_input_kernel", "_bwd_input_rows_kernel")


def _saved_bytes(fn, exclude):
    with saved_for_backward(exclude) as saved:
        out = fn()
    return out, tensor_bytes(saved)


SMS = 132  # H100 / H200


def measure(shape=(2, 64, 28, 28), dtype=torch.bfloat16, variant=None, sms=SMS):
    """Fused vs eager for one shape: launches, traffic per pass (in |x|), saved bytes;
    under the launch plan a GPU with `sms` multiprocessors gets (132: H100/H200)."""
    saved_sms = plan.INTERPRETER_SM_COUNT
    plan.INTERPRETER_SM_COUNT = sms
    try:
        return _measure(shape, dtype, variant)
    finally:
        plan.INTERPRETER_SM_COUNT = saved_sms


def _measure(shape, dtype, variant):
    m = CBAM(shape[1], **(variant or {})).train()
    x = torch.randn(shape).to(dtype).requires_grad_()
    xbytes = x.numel() * x.element_size()
    params = list(m.parameters()) + list(m.buffers())
    g = torch.randn(shape).to(dtype)

    res = {}
    with TrafficCounter() as fwd, count_torch_ops(fwd) as fwd_ops:
        out, fused_saved = _saved_bytes(lambda: m(x), params)
    with TrafficCounter() as bwd, count_torch_ops(bwd) as bwd_ops:
        out.backward(g)
    res["fused"] = dict(fwd=fwd, bwd=bwd, fwd_ops=fwd_ops, bwd_ops=bwd_ops, saved=fused_saved)

    w = m.fused_weights()
    xe = x.detach().clone().requires_grad_()
    with count_torch_ops() as efwd_ops:
        out_e, eager_saved = _saved_bytes(
            lambda: cbam_reference(xe, m.spec, w, bn_training=True, bn_momentum=0.01), params)
    with count_torch_ops() as ebwd_ops:
        out_e.backward(g)
    res["eager"] = dict(fwd_ops=efwd_ops, bwd_ops=ebwd_ops, saved=eager_saved)
    res["xbytes"] = xbytes
    return res


def traffic_rows(counter, xbytes, direction):
    rows = []
    for name, t in counter.by_kernel.items():
        rows.append(dict(direction=direction, kernel=name, launches=t.launches,
                         big_read=t.big_read / xbytes, big_written=t.big_written / xbytes,
                         small_kib=(t.small_read + t.small_written) / 1024))
    tot = counter.totals()
    rows.append(dict(direction=direction, kernel="TOTAL", launches=tot.launches,
                     big_read=tot.big_read / xbytes, big_written=tot.big_written / xbytes,
                     small_kib=(tot.small_read + tot.small_written) / 1024))
    return rows


def plan_rows(counter, direction, sms, aot_rows, dtype_name):
    """Per launch, what the plan gives the GPU: programs, programs per SM, resident
    programs per SM (the AOT build's registers and shared memory, worst build of that
    kernel and dtype), waves, bytes per program (max, mean) and load operations per
    program (max; a program's serial memory round trips are at most this)."""
    resident = {}
    for dt in ("fp32", dtype_name):  # the small-map kernels are built for fp32 statistics
        resident.update({r["kernel"]: r["resident_ctas"] for r in aot_rows
                         if r.get("dtype") == dt and "resident_ctas" in r})
    rows = []
    for rec in counter.launches:
        ctas = resident.get(rec.kernel)
        rows.append(dict(direction=direction, kernel=rec.kernel, programs=rec.programs,
                         per_sm=rec.programs / sms, resident=ctas if ctas else "-",
                         waves=-(-rec.programs // (sms * ctas)) if ctas else "-",
                         kib_max=max(rec.bytes) / 1024,
                         kib_mean=sum(rec.bytes) / rec.programs / 1024,
                         loads_max=max(rec.loads)))
    return rows


def aot_summary(arch=90):
    """Per kernel: worst registers, spills, shared memory, occupancy, 16-byte accesses, and
    how many builds have software-pipelined (cp.async) loop loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "aot.json")
        subprocess.run([sys.executable, "-m", "cbam_fused.aot", "--arch", str(arch), "--json", path],
                       env=env, capture_output=True, text=True)
        if not os.path.exists(path):
            return []
        reports = json.load(open(path))
    rows = {}
    for r in reports:
        if "error" in r:
            rows[r["name"]] = dict(kernel=r["name"], error=r["error"][:80])
            continue
        key = r["name"].split("[")[0]
        dt = r["name"].split("[")[1].split("|")[0]
        row = rows.setdefault((key, dt), dict(kernel=key, dtype=dt, builds=0, max_regs=0, spills=0,
                                              max_smem=0, min_occupancy=1.0, all_16B_loads=True,
                                              pipelined_builds=0, resident_ctas=SM_MAX_CTAS,
                                              unaligned_builds=0))
        row["builds"] += 1
        row["spills"] += r["spill_stores"] + r["spill_loads"]
        if r.get("unaligned"):
            # sizes or pointers off 16 bytes (H*W = 49, a view at an odd offset): checked
            # for spills; registers, occupancy and access widths are those of the usual
            # aligned launches
            row["unaligned_builds"] += 1
            continue
        row["max_regs"] = max(row["max_regs"], r["regs"])
        row["max_smem"] = max(row["max_smem"], r["smem"])
        row["pipelined_builds"] += r.get("cp_async", 0) > 0  # loops with cp.async loads
        row["min_occupancy"] = min(row["min_occupancy"], r["occupancy"])
        row["resident_ctas"] = min(row["resident_ctas"],
                                   resident_ctas(r["regs"], r["smem"], aot_num_warps(key)))
        # 16-byte loads of the big tensor: not possible with a dimension of 1 (builds with
        # integers equal to 1) and not counted for fp64 (v2.f64); the small-map kernels
        # read no big tensor
        if key in BIG_TENSOR_KERNELS and not r.get("ones") and dt != "fp64":
            row["all_16B_loads"] &= r["v4_loads"] > 0
        elif key not in BIG_TENSOR_KERNELS:
            row["all_16B_loads"] = "-"
    return list(rows.values())


def accounting_report(shape=(2, 64, 28, 28), dtype=torch.bfloat16):
    res = measure(shape, dtype)
    xb = res["xbytes"]
    f, e = res["fused"], res["eager"]
    print(f"== accounting without a GPU (Triton interpreter, the launch plan of a 132-SM "
          f"H100/H200), official CBAM, {dtype}, shape {shape}")
    print(f"   |x| = {xb} bytes; big = x, g, out, dx; small = gates, pooled stats, partial rows")
    print_table(traffic_rows(f["fwd"], xb, "forward") + traffic_rows(f["bwd"], xb, "backward"),
                ["direction", "kernel", "launches", "big_read", "big_written", "small_kib"])
    rows = []
    for name, d in (("cbam_fused", f), ("eager", e)):
        tri_f = d["fwd"].totals().launches if "fwd" in d else 0
        tri_b = d["bwd"].totals().launches if "bwd" in d else 0
        rows.append(dict(impl=name, fwd_triton=tri_f, fwd_torch_ops=sum(d["fwd_ops"].values()),
                         bwd_triton=tri_b, bwd_torch_ops=sum(d["bwd_ops"].values()),
                         saved_for_backward=d["saved"] / xb))
    print("   launches per forward / backward (Triton kernels + other device ops), "
          "saved for backward in |x|")
    print_table(rows, ["impl", "fwd_triton", "fwd_torch_ops", "bwd_triton", "bwd_torch_ops",
                       "saved_for_backward"])
    aot = aot_summary(90)
    dt = AOT_DTYPE_NAME[dtype]
    print(f"   per launch, what the plan gives a {SMS}-SM GPU: programs, per SM, resident per SM "
          "(sm_90 build), waves, KiB per program, load operations per program (bounds its "
          "serial memory round trips)")
    print_table(plan_rows(f["fwd"], "forward", SMS, aot, dt)
                + plan_rows(f["bwd"], "backward", SMS, aot, dt),
                ["direction", "kernel", "programs", "per_sm", "resident", "waves", "kib_max",
                 "kib_mean", "loads_max"])
    print("== ahead-of-time sm_90 builds of every launch configuration (ptxas -v)")
    print_table(aot, ["kernel", "dtype", "builds", "max_regs", "spills", "max_smem",
                      "min_occupancy", "resident_ctas", "all_16B_loads", "pipelined_builds",
                      "unaligned_builds"])
