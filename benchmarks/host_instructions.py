"""Host cost as CPU instructions per call, counted by valgrind's callgrind: a measure of the
Python and C++ work around the launches that does not move with the machine's load.

    python benchmarks/host_instructions.py [--root DIR ...] [--steps 50]

The wall-time host benchmarks (bench_host.py) swing by 10-20 % between runs on a shared
2-core machine, more than a change to the host code moves them; an instruction count
repeats to within a few thousand instructions, so a before/after comparison of two
checkouts is one run of each. Each case is the bench_host.py case of the same name, kernels
stubbed (stubs.py), bf16 8x256x28x28, timm variant, on the fast and the JIT launch path:

    training step     module forward + backward through autograd, train mode
                      (zero_grad(set_to_none=True) before each, not counted)
    inference forward module forward in eval mode under no_grad

Only the work inside the measured calls is counted: each runs inside a `filter()` call and
callgrind collects only inside CPython's filter_next (--toggle-collect), so the import of
torch, the warm-up calls (the fast path's first call captures) and the zero_grad are left
out. --root: a checkout to measure (default: this one; give several to compare, e.g. a
`git worktree` of an older commit, whose stubs.py may predate the fast path: it then runs
the JIT path only). Needs valgrind; takes about two minutes a case (torch's import runs
under valgrind too).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Run under valgrind with the checkout's benchmarks/ and root first on sys.path.
_CASE = r'''
import inspect, os, sys
os.environ["TRITON_INTERPRET"] = "1"
root, path, case, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
import torch
from cbam_fused import CBAM
from stubs import stubbed_kernels

kw = {}
if "fast" in inspect.signature(stubbed_kernels).parameters:
    kw["fast"] = path == "fast"
elif path == "fast":
    raise SystemExit("no fast path in this checkout")
with stubbed_kernels(**kw):
    m = CBAM(256, spatial_pool="mean,max", mlp_bias=False, bn_momentum=0.1, max_mode="amax")
    x = torch.randn(8, 256, 28, 28, dtype=torch.bfloat16).requires_grad_()
    g = torch.ones_like(x)

    def reset():
        m.zero_grad(set_to_none=True)
        x.grad = None

    def train(_):
        m(x).backward(g)
        return False

    def infer(_):
        with torch.no_grad():
            m(x)
        return False

    m.train(case == "training step")
    step = train if case == "training step" else infer
    for i in range(20):  # warm-up: plans, compiled-kernel capture, allocator
        reset()
        step(i)
    for i in range(steps):
        reset()
        list(filter(step, (i,)))  # counted: callgrind collects inside filter_next only
'''

CASES = ("training step", "inference forward")
PATHS = ("fast", "jit")


def count(root: str, path: str, case: str, steps: int):
    """Instructions per call of one case, or None when the checkout has no such path."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "case.py")
        with open(script, "w") as f:
            f.write(_CASE)
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, PYTHONPATH=root)
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               "--toggle-collect=filter_next", f"--callgrind-out-file={out}",
               sys.executable, script, root, path, case, str(steps)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if "no fast path" in run.stderr:
            return None
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or not found:
            raise RuntimeError(f"callgrind run failed ({root}, {path}, {case}):\n{run.stderr[-2000:]}")
        return int(found.group(1)) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", action="append", help="checkout to measure (repeatable)")
    p.add_argument("--steps", type=int, default=50, help="counted calls per case")
    p.add_argument("--case", choices=CASES, action="append", help="default: both")
    p.add_argument("--path", choices=PATHS, action="append", help="default: both")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("host_instructions.py needs valgrind")
    roots = [os.path.abspath(r) for r in (args.root or [os.path.dirname(HERE)])]
    print(f"instructions per call (callgrind, {args.steps} calls a case, kernels stubbed)")
    for case in args.case or CASES:
        for path in args.path or PATHS:
            for root in roots:
                n = count(root, path, case, args.steps)
                shown = "no such path" if n is None else f"{n:12,.0f}"
                print(f"  {case:18s} {path:4s} {shown}  {root}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
