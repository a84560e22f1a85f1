"""The main job: run the fused CBAM forward and backward and report.

    python benchmarks/run.py            (make run)

Without a GPU: the Triton kernels run in the interpreter on CPU tensors; prints the
agreement with the float64 reference, the accounting that needs no GPU (launches, bytes
moved per pass, bytes saved for backward, ahead-of-time build report) and the host-side
benchmarks (bench_host.py, through pytest-benchmark; the run is kept in a temporary
folder unless --out is given).
With a GPU: prints the agreement, then runs the pytest-benchmark cases marked
`headline` (the README's table; --marks to choose others) and prints their tables; the
run, its tables and its plot are saved in benchmarks/results/<gpu>/ (or --out).
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="use the CPU path even if a GPU is present")
    p.add_argument("--out", help="folder for the saved benchmark run (a <device> folder inside)")
    p.add_argument("--marks", default="headline", help="GPU only: pytest mark expression of the cases")
    p.add_argument("--compile-budget", type=float, default=900,
                   help="GPU only: seconds of torch.compile compilation, then those cases skip")
    args = p.parse_args(argv)

    import torch  # torch does not import triton here, so the interpreter flag still applies
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)

    import bench
    from agreement import agreement_rows
    from report import print_table

    shape = (8, 256, 28, 28) if gpu else (2, 64, 14, 14)
    print(f"== agreement with the float64 reference ({device}, shape {shape}, training mode)")
    print("   max |fused - reference| / max |reference|, forward and backward")
    print_table(agreement_rows(device, shape), ["variant", "dtype", "layout", "out", "dx", "params"])

    if gpu:
        bench_args = ["-m", args.marks, "--compile-budget", str(args.compile_budget), "--log"]
        return bench.main(bench_args + (["--out", args.out] if args.out else []))
    from accounting import accounting_report
    accounting_report()
    print("== host-side benchmarks (pytest-benchmark, benchmarks/bench_host.py)")
    with tempfile.TemporaryDirectory() as tmp:
        return bench.main(["-m", "host", "--log", "--out", args.out or tmp])


if __name__ == "__main__":
    raise SystemExit(main())
