"""Host-side cost of the torch.library registration, per op call, on the CPU.

    python benchmarks/host_overhead.py

Every op has a fake (meta) implementation, so calling it on meta tensors runs the
dispatcher and the fake function but no kernel: the difference from calling the fake
function directly is what the registration costs a call. For scale, the same is
measured for torch.library.custom_op with register_autograd, the registration style
that wraps autograd around each op (not used here). Eager calls of the fused block
bypass the dispatcher altogether (ops.passes()); under torch.compile the ops are
called from the compiled graph.
"""
import time

import torch

from cbam_fused import ops


def _per_call_us(fn, n=20000):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


@torch.library.custom_op("cbam_fused_bench::gate_apply_custom_op", mutates_args=())
def _custom(x: torch.Tensor, ca: torch.Tensor, sa: torch.Tensor, p_contig: bool) -> torch.Tensor:
    return torch.empty_like(x)


_custom.register_fake(lambda x, ca, sa, p_contig: torch.empty_like(x))
_custom.register_autograd(lambda ctx, g: (g, None, None, None))


def overhead_rows():
    x = torch.empty(8, 256, 28, 28, device="meta")
    ca = torch.empty(8, 256, device="meta")
    sa = torch.empty(8, 28 * 28, device="meta")
    fake = ops._FAKES["gate_apply"]
    direct = _per_call_us(lambda: fake(x, ca, sa, True))
    registered = _per_call_us(lambda: ops.OPS.gate_apply(x, ca, sa, True))
    custom = _per_call_us(lambda: _custom(x, ca, sa, True))
    xg = x.requires_grad_()
    custom_grad = _per_call_us(lambda: _custom(xg, ca, sa, True))
    rows = [("fake function, called directly", direct),
            ("torch.library.define/impl op (this package)", registered),
            ("custom_op + register_autograd, no grad", custom),
            ("custom_op + register_autograd, x requires grad", custom_grad)]
    return [{"call": name, "us/call": f"{t:.2f}", "over direct": f"{t - direct:.2f}"}
            for name, t in rows]


if __name__ == "__main__":
    from report import print_table
    print("== host time per op call (meta tensors, no kernel), microseconds")
    print_table(overhead_rows(), ["call", "us/call", "over direct"])
