"""How a block call issues its kernel launches: Triton's JIT launch, or the bound fast path.

Every launcher in launchers.py ends in `run(kernel, grid, args, constexprs)`, with
`args` the pointer and scalar arguments in signature order and `constexprs` the
compile-time arguments and launch options as keywords. Two callables fit there:

- `jit_launch` (the default, and the only path on CPU tensors under the interpreter):
  `kernel[grid](*args, **constexprs)`. Per launch Triton binds the arguments, computes
  their specialization, turns the options into a string for its cache key and looks
  the compiled kernel up: 10-20 us of host time per launch on the GPU image (measured
  with 3 and 20 arguments), twelve launches per training step.
- `Capture`: the same JIT launches, keeping what each one was: the compiled kernel
  (what `kernel[grid](...)` returns), the grid, the arguments and the compile-time
  arguments in signature order.

The fast path (function.py) binds a call's launches once per (plan, specialization): the
first call captures, and `Capture.program` turns the capture into a `Program`, kept on
the plan under the call key. In a program every pointer argument is a root tensor of
the call (the input, a weight, a workspace, an output: `roots`) plus a byte offset;
every integer argument is a constant of the plan; every float argument (eps, momentum:
`FLOAT_ARGS`) is read from the call. A later call with the same key allocates its
roots and replays: one `CompiledKernel.run` per launch with the roots' addresses plus
the offsets, and no launcher, tensor view, binding, cache key or lookup in between.

The call key holds what Triton specializes a launch on beyond the plan: the dtype and
the address modulo 16 of every root (the residue, not only "aligned or not": a region at
a fixed offset inside a root is aligned exactly when root residue + offset is), with the
direction, the variant's flags and the device. A call that differs in any of them
captures anew, so a pointer that is not 16-byte aligned never reaches a kernel compiled
for aligned ones.

The fast path is opt-in (environment variable CBAM_FUSED_FAST_LAUNCH=1, CUDA tensors
only) until a GPU run has passed the CUDA suite with it (README, "Launch paths").
"""
import operator
import os

import torch
from triton import knobs

FAST_LAUNCH_ENV = "CBAM_FUSED_FAST_LAUNCH"
# The float arguments of the kernels: per call values (the BatchNorm eps and momentum,
# as fp32 hi/lo pairs), never part of a program.
FLOAT_ARGS = ("eps_hi", "eps_lo", "mom_hi", "mom_lo")


def fast_launch_requested() -> bool:
    """Whether the environment asks for the fast launch path."""
    return os.environ.get(FAST_LAUNCH_ENV, "0") not in ("", "0")


# Read once at import; tests and benchmarks set it directly.
FAST_LAUNCH = fast_launch_requested()


def use_fast_launch(x: torch.Tensor) -> bool:
    """Whether a call on x takes the fast path: opted in, CUDA tensors, and no launch
    hook (a profiler's launch_enter_hook sees only JIT launches)."""
    return FAST_LAUNCH and x.is_cuda and not _launch_hooks()


def _launch_hooks() -> bool:
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def current_stream(x: torch.Tensor) -> int:
    """The raw CUDA stream the launches go to: the current stream of x's device."""
    return torch._C._cuda_getCurrentRawStream(x.get_device())


def jit_launch(kernel, grid, args, constexprs):
    """Triton's own launch: bind, specialize, look up (compile once), launch."""
    return kernel[grid](*args, **constexprs)


def call_key(tag, roots, fresh=()):
    """(key, addresses) of one block call: the key is `tag` (direction, flags, device),
    the dtype of every root and every root's address modulo 16; addresses are the roots'
    data_ptr() (0 for an absent root), then those of `fresh`.

    `fresh`: the workspaces and outputs the call has just allocated with torch.empty. Their
    dtypes follow from the plan and the roots, and the allocators place a new tensor at
    the start of a block aligned to far more than 16 bytes (CUDA's caching allocator: 512),
    so they add nothing to the key; Capture.program checks that, once, on the capturing
    call."""
    ptrs = [0 if t is None else t.data_ptr() for t in roots]
    key = (tag, tuple([None if t is None else t.dtype for t in roots]),
           tuple([p & 15 for p in ptrs]))
    ptrs += [0 if t is None else t.data_ptr() for t in fresh]
    return key, ptrs


def kernel_params(kernel):
    """The kernel's parameters (triton KernelParam: name, is_constexpr, default)."""
    return kernel.params


def constexpr_tail(kernel, constexprs):
    """The compile-time arguments in signature order, as the compiled launcher takes
    them after the runtime arguments (it ignores their values)."""
    return tuple(constexprs[p.name] if p.name in constexprs else p.default
                 for p in kernel_params(kernel) if p.is_constexpr)


class Program:
    """A call's launches bound to its roots.

    Built from the launches of a capture, each with its argument slots: (root index,
    byte offset) for a pointer, (-1, value) for a constant, (-2, name) for a float read
    per call. A replay makes one list, the pool: every distinct root+offset address, the
    floats, the constants (each launcher's leading arguments: grid, function, metadata,
    hooks; the kernels' integers and compile-time tails), then the stream; each launch
    takes its launcher's whole argument tuple from the pool with one operator.itemgetter.
    """
    __slots__ = ("addresses", "floats", "constants", "launches", "_roots", "_offsets")

    def __init__(self, launches):
        self.addresses, self.floats, self.constants = [], [], []
        shared = {}  # an address or float used by several arguments has one pool entry

        def place(kind, value):
            if kind == -1:  # constants (any value, hashable or not) are not shared
                self.constants.append(value)
                return 2, len(self.constants) - 1
            if (kind, value) not in shared:
                pool = self.addresses if kind >= 0 else self.floats
                shared[kind, value] = (0 if kind >= 0 else 1, len(pool))
                pool.append((kind, value) if kind >= 0 else value)
            return shared[kind, value]

        stream = (3, 0)  # the pool's last entry
        placed = []
        for compiled, grid, slots, tail in launches:
            # CompiledKernel.run(grid x, y, z, stream, function, packed metadata, launch
            # metadata, enter hook, exit hook, *kernel arguments)
            items = [place(-1, v) for v in (grid, 1, 1)] + [stream] + [
                place(-1, v) for v in (compiled.function, compiled.packed_metadata, None, None,
                                       None)]
            items += [place(kind, value) for kind, value in slots]
            items += [place(-1, value) for value in tail]
            placed.append((compiled, items))
        # the addresses as two parallel tuples: a replay adds them with map (no Python loop)
        self._roots = tuple(i for i, _ in self.addresses)
        self._offsets = tuple(offset for _, offset in self.addresses)
        n_a, n_f = len(self.addresses), len(self.floats)
        start = (0, n_a, n_a + n_f, n_a + n_f + len(self.constants))
        self.launches = [(compiled.run, operator.itemgetter(*[start[part] + i for part, i in items]))
                         for compiled, items in placed]

    def replay(self, ptrs, stream: int, floats):
        """Launch everything: `ptrs` the roots' addresses (call_key), `floats` the float
        arguments by name (FLOAT_ARGS), or None when the kernels take none."""
        pool = list(map(operator.add, map(ptrs.__getitem__, self._roots), self._offsets))
        if self.floats:
            pool += [floats[name] for name in self.floats]
        pool += self.constants
        pool.append(stream)
        for run, take in self.launches:
            run(*take(pool))


def _slot(param, value, roots, ptrs):
    """The program slot of one argument of a captured launch (see Program)."""
    if param.name in FLOAT_ARGS:
        return -2, param.name
    if not param.name.endswith("_ptr"):
        return -1, value
    address = value.data_ptr() if isinstance(value, torch.Tensor) else value
    if address == 0:
        return -1, 0  # an empty region (a view of no elements): the kernel never reads it
    for i, p in enumerate(ptrs):  # the start of a root
        if address == p and roots[i] is not None:
            return i, 0
    for i, (t, p) in enumerate(zip(roots, ptrs)):  # inside a root (a workspace region)
        if t is not None and p < address < p + t.numel() * t.element_size():
            return i, address - p
    return None


class Capture:
    """JIT launches of one call that keep what each launch was, for the call key `key`
    and the call's root tensors `roots` (with their addresses `ptrs`)."""

    def __init__(self, key=None, roots=(), ptrs=(), num_keyed=None):
        self.key, self.roots, self.ptrs, self.launches = key, roots, ptrs, []
        # roots past the first num_keyed are fresh allocations (call_key), outside the key
        self.num_keyed = len(roots) if num_keyed is None else num_keyed

    def launch(self, kernel, grid, args, constexprs):
        return kernel[grid](*args, **constexprs)

    def __call__(self, kernel, grid, args, constexprs):
        if len(grid) != 1:
            raise ValueError("cbam_fused: the fast launch path binds one-dimensional grids")
        compiled = self.launch(kernel, grid, args, constexprs)
        self.launches.append((kernel, compiled, grid[0], args, constexpr_tail(kernel, constexprs)))
        return compiled

    def program(self):
        """The Program of the captured launches, or None when an argument points into no
        root of the call, or a fresh root is not 16-byte aligned (then later calls capture
        again: correct, only slower)."""
        if any(p & 15 for p in self.ptrs[self.num_keyed:]):
            return None  # a fresh allocation off a 16-byte boundary: never seen, never bound
        launches = []
        for kernel, compiled, grid, args, tail in self.launches:
            params = [p for p in kernel_params(kernel) if not p.is_constexpr]
            slots = [_slot(p, a, self.roots, self.ptrs) for p, a in zip(params, args)]
            if None in slots or len(params) != len(args):
                return None
            launches.append((compiled, grid, slots, tail))
        return Program(launches)
