"""GPU speed report: cbam_fused against eager modules, torch.compile and x.clone().

For each case: median and 20/80% quantiles (triton.testing.do_bench, which clears the
L2 cache before every run; inputs are rotated too), speedups, forward time / clone
time, achieved GB/s from the bytes each pass must move (4|x| forward, 5|x| backward),
and the peak memory of a forward+backward. Results go to <out>/<gpu-name>/ as CSV,
markdown and a PNG plot, stamped with GPU, torch and triton versions and the date.
"""
import csv
import datetime
import os
import time

import torch

from cbam_fused import CBAM
from eager_modules import OfficialCBAM, eager_timm
from report import markdown_table, print_table

RESNET = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
YOLO = [(256, 80, 80), (512, 40, 40), (1024, 20, 20)]
BATCHES = (1, 8, 64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
TIMM_SPEC = dict(spatial_pool="mean,max", mlp_bias=False, bn_momentum=0.1, max_mode="amax")
ROTATE = 4  # input copies cycled through, so consecutive runs never reuse a cached input
COMPILE_BUDGET_S = 150  # total compile time allowed for the torch.compile peers


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
        return bench

    def cpu_bench(fn, reps=3):  # dry runs on CPU: plumbing only, no meaningful numbers
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        ts.sort()
        return ts[len(ts) // 2], ts[0], ts[-1]
    return cpu_bench


def _inputs(shape, dtype, layout, device, grad):
    xs = []
    for _ in range(ROTATE):
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        xs.append(x.requires_grad_(grad))
    return xs


def _cycle(xs):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(xs)
        return xs[state["i"]]
    return nxt


def _peak_mem(module, x, g, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    module(x).backward(g)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_case(shape, dtype, layout, device, bench, compile_modes):
    C = shape[1]
    xs = _inputs(shape, dtype, layout, device, grad=True)
    nxt = _cycle(xs)
    g = torch.randn_like(xs[0])
    xbytes = xs[0].numel() * xs[0].element_size()
    timm_name, timm_mod = eager_timm(C)
    peers = {"cbam_fused": CBAM(C, **TIMM_SPEC), timm_name: timm_mod, "official eager": OfficialCBAM(C)}
    peers = {k: m.to(device=device, dtype=torch.float32).train() for k, m in peers.items()}
    if dtype != torch.float32:  # eager modules need weights in the input dtype
        for k in list(peers)[1:]:
            peers[k] = peers[k].to(dtype)
    compile_s = {}
    for mode in compile_modes:
        t = time.perf_counter()
        cm = torch.compile(peers[timm_name], mode=None if mode == "default" else mode, dynamic=False)
        cm(xs[0]).backward(g)  # compile forward and backward now
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s[f"compile {mode}"] = time.perf_counter() - t
        peers[f"compile {mode}"] = cm

    rows = []
    clone_ms = bench(lambda: nxt().clone())
    for name, m in peers.items():
        with torch.no_grad():
            fwd = bench(lambda: m(nxt()))
        fb = bench(lambda: m(nxt()).backward(g))
        rows.append(dict(impl=name, fwd_ms=fwd[0], fwd_p20=fwd[1], fwd_p80=fwd[2],
                         fwdbwd_ms=fb[0], fwdbwd_p20=fb[1], fwdbwd_p80=fb[2],
                         fwd_over_clone=fwd[0] / clone_ms[0],
                         fwd_GBps=4 * xbytes / fwd[0] / 1e6,
                         fwdbwd_GBps=9 * xbytes / fb[0] / 1e6,
                         peak_MiB=_peak_mem(m, xs[0], g, device),
                         compile_s=compile_s.get(name, float("nan"))))
    fused = rows[0]
    for r in rows:
        r["fused_speedup_fwd"] = r["fwd_ms"] / fused["fwd_ms"]
        r["fused_speedup_fwdbwd"] = r["fwdbwd_ms"] / fused["fwdbwd_ms"]
    case = dict(shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1], layout=layout,
                clone_ms=clone_ms[0])
    return [dict(case, **r) for r in rows]


def cases(quick):
    shapes = RESNET + YOLO
    for (C, H, W) in shapes:
        for N in ((8, 64) if quick else BATCHES):
            for dtype in ((torch.bfloat16,) if quick else DTYPES):
                for layout in LAYOUTS:
                    yield (N, C, H, W), dtype, layout


def speed_report(device, out_dir=None, quick=False, shapes=None):
    bench = _timer(device)
    rows, compile_spent = [], 0.0
    todo = list(shapes) if shapes is not None else list(cases(quick))
    for shape, dtype, layout in todo:
        modes = []
        target = shape[0] == 64 and dtype == torch.bfloat16
        if (target or shapes is not None) and compile_spent < COMPILE_BUDGET_S:
            modes = ["default"]
            if shape[1:] in ((256, 56, 56), (256, 80, 80)) or shapes is not None:
                modes.append("max-autotune")
        try:
            case_rows = bench_case(shape, dtype, layout, device, bench, modes)
        except Exception as e:  # one failing peer must not lose the whole report
            print(f"case {shape} {dtype} {layout} failed: {type(e).__name__}: {e}")
            continue
        compile_spent += sum(r["compile_s"] for r in case_rows if r["compile_s"] == r["compile_s"])
        rows += case_rows
        torch.cuda.empty_cache() if device.type == "cuda" else None
    cols = ["shape", "dtype", "layout", "impl", "fwd_ms", "fwdbwd_ms", "fused_speedup_fwd",
            "fused_speedup_fwdbwd", "fwd_over_clone", "fwd_GBps", "fwdbwd_GBps", "peak_MiB", "compile_s"]
    print("== speed (ms: median of do_bench; speedup = peer time / cbam_fused time)")
    print_table(rows, cols)
    if out_dir:
        write_results(rows, cols, out_dir, device)
    return rows


def stamp(device):
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(gpu=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())


def write_results(rows, cols, out_dir, device):
    st = stamp(device)
    d = os.path.join(out_dir, st["gpu"].replace(" ", "_").replace("/", "_"))
    os.makedirs(d, exist_ok=True)
    keys = list(rows[0]) if rows else cols
    with open(os.path.join(d, "speed.csv"), "w", newline="") as f:
        f.write("# " + ", ".join(f"{k}={v}" for k, v in st.items()) + "\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(d, "speed.md"), "w") as f:
        f.write(f"# cbam_fused speed on {st['gpu']}\n\n" + ", ".join(f"{k}: {v}" for k, v in st.items())
                + "\n\n" + markdown_table(rows, cols) + "\n")
    plot(rows, os.path.join(d, "speed.png"), st)
    print(f"results written to {d}")


def plot(rows, path, st):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["dtype"] == "bfloat16" and r["shape"].startswith("64x")
           and r["impl"] != "cbam_fused"]
    if not sel:
        sel = [r for r in rows if r["impl"] != "cbam_fused"]
    labels = sorted({(r["shape"], r["layout"]) for r in sel})
    impls = sorted({r["impl"] for r in sel})
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = [next((r["fused_speedup_fwdbwd"] for r in sel if (r["shape"], r["layout"]) == lab
                      and r["impl"] == impl), 0) for lab in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels([f"{s}\n{l}" for s, l in labels], fontsize=7)
    ax.set_ylabel("cbam_fused speedup, forward+backward")
    ax.set_title(f"{st['gpu']}, bf16 — torch {st['torch']}, triton {st['triton']}, {st['date']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
