"""How one benchmark case is timed on a GPU: three numbers, measured apart.

- wall time (the pytest-benchmark statistics): one call from an idle, synchronized GPU
  with a cold L2 until the device is done (`benchmark.pedantic`, the target ends with
  torch.cuda.synchronize()). Before every round, outside the timing: the next of
  ROTATE input copies, zero_grad(set_to_none=True) and x.grad = None (forward+backward),
  cudagraph_mark_step_begin() (torch.compile's CUDA-graph mode), a write of 256 MiB to
  evict x from L2, a synchronize;
- host enqueue time (extra_info["host_us"]): the same call, timed until it returns
  without synchronizing: what the CPU spends issuing it. When it is close to the wall
  time the case is host-bound;
- device time (extra_info["device_us"]): the call captured once in a CUDA graph and
  replayed, each replay timed with CUDA events after an L2 flush: the GPU's own time,
  free of host overhead. torch.compile's max-autotune mode already replays its own CUDA
  graphs, so there CUDA events around a plain call give it.

Also recorded: the first call's time (compilation and Triton JIT; never inside a
timing), CUDA kernels per call (torch.profiler), peak memory of a forward+backward
above what was allocated before it, and for compiled implementations the graphs and
graph breaks Dynamo reports. On a CPU (the plumbing dry run) the same code runs with
synchronization, L2 flush, CUDA graphs and the profiler left out.
"""
import os
import statistics
import time

import torch

from implementations import uses_cuda_graphs

ROTATE = 3
ROUNDS = int(os.environ.get("CBAM_BENCH_ROUNDS", "50"))
WARMUP_ROUNDS = int(os.environ.get("CBAM_BENCH_WARMUP", "10"))
HOST_ROUNDS = DEVICE_ROUNDS = min(20, ROUNDS)
L2_FLUSH_BYTES = 256 * 2 ** 20


class CaseRunner:
    """The input, the step and the three timings of one case (see the module docstring)."""

    def __init__(self, case, module, fn, device):
        self.case, self.module, self.fn, self.device = case, module, fn, device
        self.cuda = device.type == "cuda"
        self.train = case.direction == "fwdbwd"
        self.graphs = uses_cuda_graphs(case.impl)
        fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
        # CUDA-graph mode copies every input whose address it does not know into its own
        # buffer; in a whole-model graph the block's input is the previous layer's output,
        # already there. One input marked static gives the same: no copy inside the timing.
        count = 1 if self.graphs else ROTATE
        self.inputs = [torch.randn(case.shape, device=device, dtype=case.torch_dtype)
                       .to(memory_format=fmt).requires_grad_(self.train) for _ in range(count)]
        if self.graphs:
            torch._dynamo.mark_static_address(self.inputs[0])
        self.grad_out = torch.randn_like(self.inputs[0]) if self.train else None
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        self.turn = 0

    # -- one step and what comes before it --------------------------------------------
    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self):
        if self.cuda:
            self.flush_buffer.zero_()

    def zero_grads(self, x):
        if self.train:
            self.module.zero_grad(set_to_none=True)
            x.grad = None

    def prepare(self):
        """Untimed, before every round: the pytest-benchmark `setup`."""
        self.turn = (self.turn + 1) % len(self.inputs)
        x = self.inputs[self.turn]
        self.zero_grads(x)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.flush_l2()
        self.synchronize()
        return (x,), {}

    def step(self, x):
        if self.train:
            self.fn(x).backward(self.grad_out)
        else:
            with torch.no_grad():
                self.fn(x)

    def timed_step(self, x):
        """The pytest-benchmark target: one call, finished on the device."""
        self.step(x)
        self.synchronize()

    # -- measurements besides the wall time -------------------------------------------
    def first_call_s(self):
        """Seconds of the first call: compilation, autotuning and Triton JIT."""
        (x,), _ = self.prepare()
        t0 = time.perf_counter()
        self.timed_step(x)
        return time.perf_counter() - t0

    def host_us(self):
        times = []
        for _ in range(HOST_ROUNDS):
            (x,), _ = self.prepare()
            t0 = time.perf_counter()
            self.step(x)
            times.append(time.perf_counter() - t0)
            self.synchronize()
        return statistics.median(times) * 1e6

    def device_us(self):
        """(median device time in us or None, how it was measured)."""
        if not self.cuda:
            return None, "n/a: no CUDA device"
        if self.graphs:
            held = {}

            def before():
                held["x"] = self.prepare()[0][0]
            return (self._event_times(before, lambda: self.step(held["x"])),
                    "CUDA events around a call (the compiled code replays its own CUDA graphs)")
        try:
            graph = self._capture()
        except Exception as e:  # noqa: BLE001 - recorded in the results; the wall time stands
            self.synchronize()
            return None, f"n/a: CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]})"
        us = self._event_times(self.flush_l2, graph.replay)
        del graph
        return us, "CUDA graph replay"

    def _capture(self):
        x = self.inputs[0]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.zero_grads(x)
                self.step(x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.zero_grads(x)  # the gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(x)
        self.synchronize()
        return graph

    def _event_times(self, before, run):
        """Median over DEVICE_ROUNDS of CUDA-event time of run(), before() untimed."""
        times = []
        for _ in range(DEVICE_ROUNDS):
            before()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def kernels_per_call(self):
        """CUDA kernels, memsets and copies the device runs for one call."""
        if not self.cuda:
            return None
        from torch.profiler import ProfilerActivity, profile

        (x,), _ = self.prepare()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.step(x)
            self.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    def peak_mib(self):
        """Forward+backward: peak memory above what was allocated before the call (the
        saved activations, the output and the gradients). None where it means nothing:
        no CUDA, the forward only, or a CUDA-graph pool allocated ahead of the call."""
        if not (self.cuda and self.train) or self.graphs:
            return None
        (x,), _ = self.prepare()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(x)
        self.synchronize()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20
