"""Tables and the plot from saved pytest-benchmark runs (the JSON of --benchmark-json).

    python benchmarks/results_report.py RUN.json [--md OUT.md] [--png OUT.png]

- the block table: per group (one comparison), each implementation's wall time (median
  of the pytest-benchmark rounds), host enqueue time, device time, CUDA kernels per call,
  GB/s (the bytes the fused design must move, 4|x| or 9|x|, over the wall and the device
  time), peak memory of forward+backward, first-call seconds, and cbam_fused's speedup
  (peer wall time / cbam_fused wall time);
- the headline table of the README: bf16 ResNet-50 sites, speedup of cbam_fused over
  eager timm and over torch.compile max-autotune, forward and forward+backward;
- the host table (bench_host.py): median microseconds per call;
- the plot: cbam_fused's speedup over each peer, per shape and layout, bf16.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import format_table, markdown_table  # noqa: E402

FUSED = "cbam_fused"
BLOCK_COLUMNS = ["group", "impl", "wall_us", "host_us", "device_us", "kernels", "GBps_wall",
                 "GBps_device", "peak_MiB", "first_call_s", "fused_speedup"]


def load(path):
    with open(path) as f:
        return json.load(f)


def block_rows(run):
    """One row per block benchmark, with its group's cbam_fused speedup."""
    rows = []
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if "impl" not in info:
            continue
        wall_s = b["stats"]["median"]
        dev_us = info.get("device_us")
        rows.append(dict(
            group=b["group"], impl=info["impl"], direction=info["direction"], dtype=info["dtype"],
            layout=info["layout"], shape="x".join(map(str, info["shape"])),
            wall_us=wall_s * 1e6, host_us=info.get("host_us"), device_us=dev_us,
            kernels=info.get("kernels"), peak_MiB=info.get("peak_MiB"),
            first_call_s=info.get("first_call_s"),
            GBps_wall=info["pass_bytes"] / wall_s / 1e9,
            GBps_device=info["pass_bytes"] / (dev_us * 1e-6) / 1e9 if dev_us else None))
    fused = {r["group"]: r["wall_us"] for r in rows if r["impl"] == FUSED}
    for r in rows:
        if r["group"] in fused and r["impl"] != FUSED:
            r["fused_speedup"] = r["wall_us"] / fused[r["group"]]
    return rows


def host_rows(run):
    return [dict(group=b["group"], name=b["name"], median_us=b["stats"]["median"] * 1e6,
                 launches=b.get("extra_info", {}).get("launches"))
            for b in run["benchmarks"] if "impl" not in b.get("extra_info", {})]


def _shape_layout_order(key):
    """(shape string, layout) sorted by batch, then largest spatial size first, layout."""
    shape, layout = key
    N, _, H, _ = map(int, shape.split("x"))
    return N, -H, layout


def headline_rows(rows, peers=("timm", "compile-max-autotune")):
    """bf16 rows of (shape, layout): cbam_fused wall time and speedup over each peer, per
    direction. A speedup cell is empty where the peer was not measured."""
    sel = [r for r in rows if r["dtype"] == "bf16"]
    keys = sorted({(r["shape"], r["layout"]) for r in sel if r["impl"] == FUSED},
                  key=_shape_layout_order)
    out = []
    for shape, layout in keys:
        row = {"shape": shape, "layout": layout}
        for direction in ("fwd", "fwdbwd"):
            here = {r["impl"]: r for r in sel if (r["shape"], r["layout"], r["direction"]) ==
                    (shape, layout, direction)}
            if FUSED not in here:
                continue
            row[f"{direction} cbam_fused us"] = here[FUSED]["wall_us"]
            for peer in peers:
                if peer in here:
                    row[f"{direction} vs {peer}"] = here[peer]["fused_speedup"]
        out.append(row)
    return out


def headline_columns(peers=("timm", "compile-max-autotune")):
    return ["shape", "layout"] + [f"{d} {c}" for d in ("fwd", "fwdbwd")
                                  for c in ["cbam_fused us"] + [f"vs {p}" for p in peers]]


def stamp_line(run):
    m = run["machine_info"]
    keys = ("device", "torch", "triton", "cuda", "date")
    return ", ".join(f"{k} {m[k]}" for k in keys if m.get(k)) + f", commit {run['commit_info'].get('id', '?')[:10]}"


def markdown_report(run):
    rows = block_rows(run)
    parts = [f"# cbam_fused benchmarks\n\n{stamp_line(run)}\n"]
    if rows:
        parts.append("## Headline (bf16; speedup = peer wall time / cbam_fused wall time)\n\n"
                     + markdown_table(headline_rows(rows), headline_columns()) + "\n")
        parts.append("## Every block case (times in us, medians)\n\n"
                     + markdown_table(rows, BLOCK_COLUMNS) + "\n")
    hosts = host_rows(run)
    if hosts:
        parts.append("## Host side (kernels stubbed; us per call, median)\n\n"
                     + markdown_table(hosts, ["group", "name", "median_us", "launches"]) + "\n")
    return "\n".join(parts)


def print_report(run):
    print(f"== {stamp_line(run)}")
    rows = block_rows(run)
    if rows:
        print("== block, times in us (medians); fused_speedup = peer wall / cbam_fused wall")
        print(format_table(rows, BLOCK_COLUMNS) + "\n")
        print("== headline, bf16")
        print(format_table(headline_rows(rows), headline_columns()) + "\n")
    hosts = host_rows(run)
    if hosts:
        print("== host side, kernels stubbed, us per call (median)")
        print(format_table(hosts, ["group", "name", "median_us", "launches"]) + "\n")


def plot(run, path):
    """cbam_fused's speedup over each peer (bf16, forward and forward+backward). Returns
    False, writing nothing, when the run has no bf16 block case."""
    rows = [r for r in block_rows(run) if r["dtype"] == "bf16" and "fused_speedup" in r]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["shape"], r["layout"]) for r in rows}, key=_shape_layout_order)
    peers = sorted({r["impl"] for r in rows})
    fig, axes = plt.subplots(2, 1, figsize=(max(7, len(labels) * 1.1), 8), sharex=True)
    width = 0.8 / len(peers)
    for ax, direction in zip(axes, ("fwd", "fwdbwd")):
        for i, peer in enumerate(peers):
            vals = [next((r["fused_speedup"] for r in rows if (r["shape"], r["layout"]) == lab
                          and r["impl"] == peer and r["direction"] == direction), float("nan"))
                    for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=peer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log", base=2)
        ax.set_ylabel(f"cbam_fused speedup\n{'forward (eval, no_grad)' if direction == 'fwd' else 'forward+backward (train)'}")
        ax.legend(fontsize=7, ncol=3)
    axes[-1].set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    axes[-1].set_xticklabels([f"{s}\n{lay}" for s, lay in labels], fontsize=7)
    axes[0].set_title(f"bf16 — {stamp_line(run)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a JSON file written by --benchmark-json")
    p.add_argument("--md", help="write the markdown report here")
    p.add_argument("--png", help="write the speedup plot here")
    args = p.parse_args(argv)
    run = load(args.run)
    print_report(run)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown_report(run))
    if args.png and plot(run, args.png):
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
