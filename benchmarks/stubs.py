"""Triton kernels replaced by stubs, so that the host work around the launches can be
timed alone (bench_host.py): `kernel[grid](...)` counts the launch and does nothing.

With `fast=True` the block calls take the fast launch path (cbam_fused/launch.py) on any
device: the stub launch returns a stub compiled kernel, which the replays of later
calls launch (and count) through its `run`, as they would a compiled kernel's launcher.
"""
import contextlib

from triton.runtime.jit import JITFunction

import cbam_fused.function as F
import cbam_fused.launchers as L
from cbam_fused.plan import block_plan


class _StubCompiled:
    """What a replay needs of a compiled kernel: function, packed_metadata, run."""

    def __init__(self, counter):
        self.counter = counter
        self.function = self.packed_metadata = None

    def run(self, *args):
        self.counter[0] += 1


class _StubKernel:
    def __init__(self, counter, real):
        self.counter = counter
        self.compiled = _StubCompiled(counter)
        # what the fast path reads of a kernel: its name and parameters (the interpreter's
        # kernels have no parameter list: a JITFunction of the same source has)
        self.fn = real.fn
        self.params = real.params if hasattr(real, "params") else JITFunction(real.fn).params

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[0] += 1
            return self.compiled
        return launch


@contextlib.contextmanager
def stubbed_kernels(fast: bool = False):
    """Every kernel the launchers use replaced by a stub; yields [launch count]. fast: the
    block calls capture and replay (the stub compiled kernels) whatever the device."""
    counter = [0]
    names = [n for n in vars(L) if n.startswith("_") and n.endswith("_kernel")]
    saved = {n: getattr(L, n) for n in names}
    saved_path = F.use_fast_launch, F.current_stream
    block_plan.cache_clear()  # no plan keeps compiled kernels of real (or other stub) kernels
    for n in names:
        setattr(L, n, _StubKernel(counter, saved[n]))
    if fast:
        F.use_fast_launch, F.current_stream = (lambda x: True), (lambda x: 0)
    try:
        yield counter
    finally:
        for n, k in saved.items():
            setattr(L, n, k)
        block_plan.cache_clear()  # nor stub ones
        F.use_fast_launch, F.current_stream = saved_path
