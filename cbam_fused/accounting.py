"""Count what the kernels do, without a GPU: launches, and bytes each pass moves.

Under TRITON_INTERPRET=1 every tl.load / tl.store goes through the interpreter's
builder; `TrafficCounter` wraps those calls and adds up the bytes of the lanes
whose mask is on. Bytes are split into the big tensors (x, g, out, dx: the
pointer arguments named x_ptr, g_ptr, out_ptr, dx_ptr, which are what DRAM
bandwidth pays for) and the small operands (gates, pooled statistics, partial
rows), which on a GPU come mostly from L2.

Other device work (the small maps phi and psi, partial-row sums, allocations
that launch nothing) is counted by `count_torch_ops`, a dispatch-mode tally of
the aten operators that run outside the Triton kernels; `saved_for_backward`
collects what autograd keeps for the backward.
"""
import collections
import contextlib

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

BIG_TENSOR_ARGS = ("x_ptr", "g_ptr", "out_ptr", "dx_ptr")

# aten ops that launch no kernel on a GPU (views, metadata, allocation without fill)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "view", "_unsafe_view", "reshape", "permute", "expand", "slice", "select",
              "unsqueeze", "squeeze", "t", "transpose", "detach", "alias", "as_strided",
              "split", "split_with_sizes", "unbind", "chunk", "narrow", "lift_fresh",
              "set_", "is_same_size", "_to_copy_noop", "sym_size", "sym_stride"}


class PassTraffic:
    def __init__(self):
        self.launches = 0
        self.big_read = 0
        self.big_written = 0
        self.small_read = 0
        self.small_written = 0


class LaunchRecord:
    """What one launch gives the GPU: its programs, and per program the bytes it loads and
    stores and the load operations it issues (a tile load is one operation; the loads
    of one loop step are issued together, so a program's serial memory round trips are
    at most its load operations, and about its loop steps)."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.bytes = []   # per program
        self.loads = []   # per program

    @property
    def programs(self):
        return len(self.bytes)


class TrafficCounter:
    """Context manager: per-kernel launches and bytes, counted in the interpreter, and
    one LaunchRecord per launch (`launches`)."""

    def __init__(self):
        self.by_kernel = collections.OrderedDict()
        self.order = []  # kernel name per launch, in launch order
        self.launches = []  # LaunchRecord per launch, in launch order
        self._ranges = []
        self._current = None
        self.in_launch = False

    def __enter__(self):
        from triton.runtime import interpreter as I

        if not isinstance(getattr(I, "interpreter_builder", None), I.InterpreterBuilder):
            raise RuntimeError("TrafficCounter needs TRITON_INTERPRET=1")
        self._I = I
        self._saved = {name: getattr(I.InterpreterBuilder, name) for name in
                       ("create_masked_load", "create_masked_store", "create_load", "create_store")}
        self._saved_call = I.GridExecutor.__call__
        self._saved_grid_idx = I.InterpreterBuilder.set_grid_idx
        self._saved_init = I.GridExecutor._init_args_hst
        counter = self

        def init_args(executor, args_dev, kwargs):
            args_hst, kwargs_hst = counter._saved_init(executor, args_dev, kwargs)
            names = executor.arg_names
            counter._ranges = []
            for name, arg in list(zip(names, args_hst)) + list(kwargs_hst.items()):
                if name in BIG_TENSOR_ARGS and hasattr(arg, "data_ptr"):
                    lo = arg.data_ptr()
                    counter._ranges.append((lo, lo + arg.untyped_storage().nbytes()))
            return args_hst, kwargs_hst

        def call(executor, *args, **kwargs):
            name = executor.fn.__name__
            counter._current = counter.by_kernel.setdefault(name, PassTraffic())
            counter._current.launches += 1
            counter.order.append(name)
            counter.launches.append(LaunchRecord(name))
            counter.in_launch = True
            try:
                return counter._saved_call(executor, *args, **kwargs)
            finally:
                counter.in_launch = False

        def grid_idx(builder, *idx):
            if counter.in_launch:
                counter.launches[-1].bytes.append(0)
                counter.launches[-1].loads.append(0)
            return counter._saved_grid_idx(builder, *idx)

        def masked_load(builder, ptrs, mask, *a):
            counter._count(ptrs, mask, store=False)
            return self._saved["create_masked_load"](builder, ptrs, mask, *a)

        def masked_store(builder, ptrs, value, mask, *a):
            counter._count(ptrs, mask, store=True)
            return self._saved["create_masked_store"](builder, ptrs, value, mask, *a)

        def load(builder, ptr, *a):
            counter._count(ptr, None, store=False)
            return self._saved["create_load"](builder, ptr, *a)

        def store(builder, ptr, val, *a):
            counter._count(ptr, None, store=True)
            return self._saved["create_store"](builder, ptr, val, *a)

        I.GridExecutor._init_args_hst = init_args
        I.GridExecutor.__call__ = call
        I.InterpreterBuilder.set_grid_idx = grid_idx
        I.InterpreterBuilder.create_masked_load = masked_load
        I.InterpreterBuilder.create_masked_store = masked_store
        I.InterpreterBuilder.create_load = load
        I.InterpreterBuilder.create_store = store
        return self

    def __exit__(self, *exc):
        I = self._I
        for name, fn in self._saved.items():
            setattr(I.InterpreterBuilder, name, fn)
        I.GridExecutor.__call__ = self._saved_call
        I.InterpreterBuilder.set_grid_idx = self._saved_grid_idx
        I.GridExecutor._init_args_hst = self._saved_init

    def _count(self, ptrs, mask, store: bool):
        if self._current is None:
            return
        addr = np.asarray(ptrs.data).astype(np.uint64)
        on = np.ones(addr.shape, bool) if mask is None else np.asarray(mask.data).astype(bool)
        on = np.broadcast_to(on, addr.shape)
        size = np.dtype(self._I._get_np_dtype(ptrs.get_element_ty())).itemsize
        big = np.zeros(addr.shape, bool)
        for lo, hi in self._ranges:
            big |= (addr >= lo) & (addr < hi)
        n_big = int((on & big).sum()) * size
        n_small = int((on & ~big).sum()) * size
        t = self._current
        if self.launches and self.launches[-1].bytes:
            rec = self.launches[-1]
            rec.bytes[-1] += n_big + n_small
            rec.loads[-1] += 0 if store else 1
        if store:
            t.big_written += n_big
            t.small_written += n_small
        else:
            t.big_read += n_big
            t.small_read += n_small

    def totals(self):
        t = PassTraffic()
        for p in self.by_kernel.values():
            for k in vars(t):
                setattr(t, k, getattr(t, k) + getattr(p, k))
        return t


class _OpCounter(TorchDispatchMode):
    def __init__(self, traffic):
        super().__init__()
        self.ops = collections.Counter()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        inside_kernel = self.traffic is not None and self.traffic.in_launch
        if name not in _NO_KERNEL and not inside_kernel:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def saved_for_backward(exclude=()):
    """Collect the tensors autograd saves for backward inside the block, leaving out
    those that share storage with `exclude` (parameters and buffers: saving them
    allocates nothing)."""
    ptrs = {t.data_ptr() for t in exclude}
    saved = []

    def pack(t):
        if t.data_ptr() not in ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def count_torch_ops(traffic: "TrafficCounter" = None):
    """Tally of aten operators that would launch device work (views and bare allocations
    excluded). With `traffic`, the interpreter's own bookkeeping inside a Triton launch
    is not counted."""
    mode = _OpCounter(traffic)
    with mode:
        yield mode.ops
