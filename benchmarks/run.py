"""The main job: run the fused CBAM forward and backward and report.

    python benchmarks/run.py            (make run)

Without a GPU: the Triton kernels run in the interpreter on CPU tensors; prints the
agreement with the float64 reference and the accounting that needs no GPU (launches,
bytes moved per pass, bytes saved for backward, ahead-of-time build report).
With a GPU: prints the agreement and the speed table; `--out DIR` writes CSV,
markdown and a PNG plot there.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="use the CPU path even if a GPU is present")
    p.add_argument("--out", help="GPU only: directory for the CSV / markdown / PNG results")
    p.add_argument("--quick", action="store_true", help="GPU only: fewer shapes")
    args = p.parse_args(argv)

    import torch  # torch does not import triton here, so the interpreter flag still applies
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)

    from agreement import agreement_rows
    from report import print_table

    shape = (8, 256, 28, 28) if gpu else (2, 64, 14, 14)
    print(f"== agreement with the float64 reference ({device}, shape {shape}, training mode)")
    print("   max |fused - reference| / max |reference|, forward and backward")
    print_table(agreement_rows(device, shape), ["variant", "dtype", "layout", "out", "dx", "params"])

    if gpu:
        from speed import speed_report
        speed_report(device, out_dir=args.out, quick=args.quick)
    else:
        from accounting import accounting_report
        from host_overhead import overhead_rows
        accounting_report()
        print("== host time per call on this CPU (kernels stubbed, no launch), us")
        print_table(overhead_rows(), ["call", "us/call", "over direct"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
