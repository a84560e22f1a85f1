"""Host-side cost of a fused block call on the CPU, without the kernels.

    python benchmarks/host_overhead.py

1. The Python work around the launches (plan lookup, workspace allocation and carving,
   argument assembly), per forward and per backward: the kernels are replaced by stubs
   and the block runs on CPU tensors, so what is timed is everything but the launches.
   A real launch adds Triton's own launch cost on top (measured on the GPU by
   benchmarks/gpu_quick.py: host enqueue time per call).
2. The torch.library registration: an op call on meta tensors runs the dispatcher and
   the fake function but no kernel; the difference from calling the fake function
   directly is what the registration costs a call. Eager calls of the fused block bypass
   the dispatcher altogether (ops.passes()); under torch.compile the ops are called from
   the compiled graph.
"""
import contextlib
import time

import torch

import cbam_fused.launchers as L
from cbam_fused import CBAM, ops
from cbam_fused.function import fused_backward, fused_forward
from cbam_fused.launchers import dense_layout

TIMM_SPEC = dict(spatial_pool="mean,max", mlp_bias=False, bn_momentum=0.1, max_mode="amax")


def _per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


class _StubKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[0] += 1
        return launch


@contextlib.contextmanager
def stubbed_kernels():
    """Every kernel the launchers use replaced by a stub; yields [launch count]."""
    counter = [0]
    names = [n for n in vars(L) if n.startswith("_") and n.endswith("_kernel")]
    saved = {n: getattr(L, n) for n in names}
    for n in names:
        setattr(L, n, _StubKernel(counter))
    try:
        yield counter
    finally:
        for n, k in saved.items():
            setattr(L, n, k)


def glue_rows(shape=(8, 256, 28, 28)):
    m = CBAM(shape[1], **TIMM_SPEC).train()
    w = m.fused_weights()
    x = torch.empty(shape, dtype=torch.bfloat16)
    xd, p_contig = dense_layout(x)
    rows = []
    with stubbed_kernels() as launches:
        out, sa, si = fused_forward(xd, p_contig, m.spec, w, True, 0.1)
        launches[0] = 0
        fused_forward(xd, p_contig, m.spec, w, True, 0.1)
        n_fwd = launches[0]
        fwd = _per_call_us(lambda: fused_forward(xd, p_contig, m.spec, w, True, 0.1))
        launches[0] = 0
        fused_backward(out, xd, p_contig, sa, si, m.spec, w, True, True)
        n_bwd = launches[0]
        bwd = _per_call_us(lambda: fused_backward(out, xd, p_contig, sa, si, m.spec, w, True, True))
    rows.append({"call": f"forward glue, {n_fwd} launches stubbed", "us/call": f"{fwd:.1f}"})
    rows.append({"call": f"backward glue, {n_bwd} launches stubbed", "us/call": f"{bwd:.1f}"})
    return rows


def registration_rows():
    m = CBAM(256, **TIMM_SPEC).to("meta").train()
    w = m.fused_weights()
    x = torch.empty(8, 256, 28, 28, device="meta")
    args = (x, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, w.conv_weight, w.conv_bias,
            w.bn_weight, w.bn_bias, w.bn_running_mean, w.bn_running_var,
            w.bn_num_batches_tracked, True, m.spec.channel_pool, m.spec.spatial_pool,
            m.spec.kernel_size, m.spec.max_mode, m.spec.bn_eps, True, True, 0.1)
    direct = _per_call_us(lambda: ops._FAKES["block_forward"](*args), n=500)
    registered = _per_call_us(lambda: ops.OPS_RAW.block_forward(*args), n=500)
    return [{"call": "block_forward fake, called directly", "us/call": f"{direct:.1f}"},
            {"call": "block_forward through the registered op", "us/call": f"{registered:.1f}",
             "over direct": f"{registered - direct:.1f}"}]


def overhead_rows():
    return glue_rows() + registration_rows()


if __name__ == "__main__":
    from report import print_table
    print("== host time per call on this CPU (meta tensors, no kernel), microseconds")
    print_table(overhead_rows(), ["call", "us/call", "over direct"])
