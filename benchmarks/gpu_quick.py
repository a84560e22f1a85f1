"""The short benchmark of `make gpu-check` (about a minute on an H100/H200).

For a few bf16 training-mode cases, cbam_fused (a timm CbamModule converted with
cbam_fused.convert) against the same eager timm module:
- wall time of forward (no_grad) and forward+backward: triton.testing.do_bench median,
  inputs rotated;
- host enqueue time: a loop of calls without synchronization, divided by the count;
- CUDA kernels per call (torch.profiler): what the launch-minimal work must cut.
Prints one table and writes quick.csv into the results folder given by --out.
"""
import argparse
import csv
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CASES = [((64, 256, 56, 56), "nchw"), ((64, 256, 56, 56), "channels_last"),
         ((64, 2048, 7, 7), "nchw"), ((1, 256, 56, 56), "nchw")]
ROTATE = 3
HOST_CALLS = 20


def _modules(C, device, dtype):
    import copy

    import cbam_fused
    from eager_modules import eager_timm

    name, eager = eager_timm(C)
    eager = eager.to(device=device, dtype=dtype).train()
    fused = cbam_fused.convert(copy.deepcopy(eager))
    return {name: eager, "cbam_fused": fused}


def _inputs(shape, layout, device, dtype):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
            for _ in range(ROTATE)]


def _host_us(fn):
    """Wall time of HOST_CALLS calls issued without synchronizing, per call (us)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    host = (time.perf_counter() - t) / HOST_CALLS * 1e6
    torch.cuda.synchronize()
    return host


def kernels_per_call(fn):
    """CUDA kernels (and memsets/copies) the device runs for one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(out_dir=None):
    from triton.testing import do_bench

    from report import print_table

    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for shape, layout in CASES:
        xs = _inputs(shape, layout, device, dtype)
        g = torch.randn_like(xs[0])
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % ROTATE
            return xs[state["i"]]
        for impl, m in _modules(shape[1], device, dtype).items():
            def fwd():
                with torch.no_grad():
                    return m(nxt())

            def fwdbwd():
                m(nxt()).backward(g)
            row = dict(shape="x".join(map(str, shape)), layout=layout, impl=impl)
            row["fwd_ms"] = do_bench(fwd, warmup=5, rep=25)
            row["fwdbwd_ms"] = do_bench(fwdbwd, warmup=5, rep=25)
            row["fwd_host_us"] = _host_us(fwd)
            row["fwdbwd_host_us"] = _host_us(fwdbwd)
            row["fwd_kernels"] = kernels_per_call(fwd)
            row["fwdbwd_kernels"] = kernels_per_call(fwdbwd)
            rows.append(row)
        eager_row, fused_row = rows[-2], rows[-1]
        fused_row["speedup_fwdbwd"] = eager_row["fwdbwd_ms"] / fused_row["fwdbwd_ms"]
        torch.cuda.empty_cache()
    cols = ["shape", "layout", "impl", "fwd_ms", "fwdbwd_ms", "speedup_fwdbwd", "fwd_host_us",
            "fwdbwd_host_us", "fwd_kernels", "fwdbwd_kernels"]
    print(f"== {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, training mode")
    print_table(rows, cols)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "quick.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for quick.csv")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_quick.py needs a CUDA device")
    run(args.out)
