"""Run the pytest-benchmark suite and keep what it measured (`make bench`), or compare
saved runs (`make bench-compare`).

    python benchmarks/bench.py [-m MARKEXPR] [--out DIR] [--compile-budget S] [-- PYTEST ARGS]
    python benchmarks/bench.py --compare [--out DIR]

Runs `pytest benchmarks/ --benchmark-only` with the mark expression (default: every
case; see cases.py for the marks) and saves the run as JSON in
DIR/<device>/<date>_<label>.json (DIR defaults to benchmarks/results), with the device,
torch, triton and CUDA versions and the date in its machine_info. Next to it:
<stem>.md (the tables of results_report.py), <stem>.png (cbam_fused's speedup plot,
when the run has bf16 block cases), <stem>-compare.txt (`pytest-benchmark compare`'s
table) and <stem>-histogram*.svg (its histograms; needs pygal). Without a GPU the block
cases skip and the host cases run.

--compare runs `pytest-benchmark compare` over every saved run under DIR (all machines,
all dates; same-named benchmarks side by side) into DIR/compare/: table.txt and the
histograms.
"""
import argparse
import datetime
import glob
import os
import re
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def label_of(marks):
    return re.sub(r"[^A-Za-z0-9]+", "-", marks).strip("-") if marks else "all"


def compare(json_paths, table_path, histogram_prefix):
    """`pytest-benchmark compare` over saved runs: the table into table_path and, when
    pygal is installed, per-group histograms <histogram_prefix>-*.svg."""
    cmd = [sys.executable, "-m", "pytest_benchmark", "compare", *json_paths,
           "--group-by=group", "--sort=name", "--columns=min,median,iqr,rounds"]
    try:
        import pygal  # noqa: F401
        cmd.append(f"--histogram={histogram_prefix}")
    except ImportError:
        print("pygal not installed: no histogram (pip install pygal pygaljs)")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(table_path, "w") as f:
        f.write(res.stdout + res.stderr)
    return res.returncode


def compare_saved(out):
    paths = sorted(glob.glob(os.path.join(out, "*", "*.json")))
    if not paths:
        print(f"no saved runs under {out}")
        return 1
    folder = os.path.join(out, "compare")
    os.makedirs(folder, exist_ok=True)
    rc = compare(paths, os.path.join(folder, "table.txt"), os.path.join(folder, "histogram"))
    with open(os.path.join(folder, "table.txt")) as f:
        print(f.read())
    print(f"compared {len(paths)} runs: {folder}/table.txt and histograms")
    return rc


def run_pytest(cmd, time_limit=None, **popen_kwargs):
    """pytest in a child process; past time_limit it gets SIGINT, which pytest turns into
    an orderly end of the session: pytest-benchmark still writes the JSON of what ran."""
    child = subprocess.Popen(cmd, cwd=ROOT, **popen_kwargs)
    try:
        return child.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        print(f"time limit of {time_limit:.0f} s reached: interrupting pytest", flush=True)
        child.send_signal(signal.SIGINT)
        try:
            return child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", dest="marks", default="", help="pytest mark expression (e.g. headline, quick, host)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder (a <device> folder is made inside)")
    p.add_argument("--compile-budget", type=float, help="seconds of torch.compile compilation, then those cases skip")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="interrupt pytest (SIGINT) after this long: the benchmarks finished so far are still saved")
    p.add_argument("--log", action="store_true", help="pytest's output into <stem>.log, not the terminal")
    p.add_argument("--compare", action="store_true", help="compare the saved runs under --out instead")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)
    if args.compare:
        return compare_saved(args.out)

    import machine
    import results_report

    folder = os.path.join(args.out, machine.slug())
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{datetime.date.today().isoformat()}_{label_of(args.marks)}")
    cmd = [sys.executable, "-m", "pytest", os.path.relpath(HERE, ROOT), "--benchmark-only",
           "-p", "no:cacheprovider", "-q", "-rs", f"--benchmark-json={stem}.json"]
    if args.marks:
        cmd += ["-m", args.marks]
    if args.compile_budget is not None:
        cmd += [f"--bench-compile-budget={args.compile_budget}"]
    cmd += args.pytest_args
    print("$", " ".join(cmd), flush=True)
    if args.log:
        with open(f"{stem}.log", "w") as log:
            rc = run_pytest(cmd, args.time_limit, stdout=log, stderr=subprocess.STDOUT)
    else:
        rc = run_pytest(cmd, args.time_limit)
    if not os.path.exists(f"{stem}.json"):
        print(f"no results written (pytest exit code {rc})")
        return rc or 1

    run = results_report.load(f"{stem}.json")
    results_report.print_report(run)
    with open(f"{stem}.md", "w") as f:
        f.write(results_report.markdown_report(run))
    if results_report.plot(run, f"{stem}.png"):
        print(f"plot: {stem}.png")
    compare([f"{stem}.json"], f"{stem}-compare.txt", f"{stem}-histogram")
    print(f"saved: {stem}.json (+ .md, -compare.txt)")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
