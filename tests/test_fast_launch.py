"""The fast launch path (cbam_fused/launch.py) on the CPU: its key against Triton's own
specialization, and its replays against the launches they stand for.

No compiled kernel exists here, so the checks take the two halves apart:
- Triton's specialization of every launch is computed by Triton's own binder for a
  CUDA target (the function `JITFunction.run` calls on a GPU) from the real arguments
  of interpreter runs; the fast path's call key must determine it: two calls with the
  same key specialize every launch alike. The calls include pointers that are not
  16-byte aligned, other dtypes and integer arguments equal to 1.
- A replay launches fake compiled kernels that record what they receive. Every pointer
  (a view's address on a capturing call, an int on a replay) is named by the root
  tensor of its call it points into and its offset there; the replay of a call must
  pass what a call capturing the same launches passes, the per-call BatchNorm momentum
  included.
On a GPU, tests/test_cuda_fast_launch.py runs the path for real against the JIT path.
"""
import functools

import pytest
import torch
from helpers import VARIANTS
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import cbam_fused.function as F
from cbam_fused import CBAM, launch
from cbam_fused.launch import Capture, call_key, use_fast_launch
from cbam_fused.plan import block_plan


@functools.lru_cache(maxsize=None)
def _compiled_twin(kernel):
    """The JITFunction a GPU run would launch, for a kernel the interpreter runs here."""
    return JITFunction(kernel.fn, **kernel.kwargs)


@functools.lru_cache(maxsize=None)
def _cuda_binder(kernel):
    """Triton's argument binder for sm_90: (bound args, specialization, options)."""
    twin = _compiled_twin(kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return create_function_from_signature(twin.signature, twin.params, backend)


@pytest.fixture(autouse=True)
def _fast_path_on_the_interpreter(monkeypatch):
    """Every call takes the fast path; the interpreter's kernels have no parameter list,
    their compiled twins have. The plans keep what the calls bound (fake kernels here):
    dropped after the test."""
    monkeypatch.setattr(F, "use_fast_launch", lambda x: True)
    monkeypatch.setattr(F, "current_stream", lambda x: 0)
    monkeypatch.setattr(launch, "kernel_params", lambda k: _compiled_twin(k).params)
    yield
    block_plan.cache_clear()


def _misaligned(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """A copy of t whose address is `elements` elements past a 16-byte boundary."""
    buf = torch.empty(t.numel() + elements, dtype=t.dtype)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def _module(variant, channels, dtype, layout, **options):
    m = CBAM(channels, **{**VARIANTS[variant], **options}).train().to(dtype)
    if layout == "cl":
        m = m.to(memory_format=torch.channels_last)
    return m


def _input(shape, dtype, layout):
    x = torch.randn(shape, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "cl" else x


def _step(m, x):
    x = x.detach().requires_grad_()
    m(x).backward(torch.randn_like(x))


class _SpecCapture(Capture):
    """Runs each launch in the interpreter and keeps Triton's sm_90 specialization of it;
    binds nothing (so that every call captures)."""

    def launch(self, kernel, grid, args, constexprs):
        _, spec, _ = _cuda_binder(kernel)(*args, **constexprs)
        params = _compiled_twin(kernel).params
        # the fast path knows a pointer by its name (launch._slot): Triton agrees
        for p, (kind, _) in zip(params, spec):
            assert (kind.startswith("*") == p.name.endswith("_ptr")), (kernel.fn.__name__, p.name)
        self.specs = getattr(self, "specs", []) + [(kernel.fn.__name__, tuple(spec))]
        kernel[grid](*args, **constexprs)


def test_call_key_determines_triton_specialization(monkeypatch):
    records = []  # ((plan, call key), launches' specializations)
    monkeypatch.setattr(F, "Capture", _SpecCapture)
    monkeypatch.setattr(F, "_bind",
                        lambda plan, run: records.append(((id(plan), run.key), tuple(run.specs))))
    cases = [("official", "nchw", torch.float32, (2, 16, 4, 5)),
             ("timm", "cl", torch.bfloat16, (2, 16, 4, 5)),
             ("ultralytics", "nchw", torch.float16, (2, 8, 3, 3)),
             ("no_spatial", "cl", torch.float32, (2, 16, 4, 5)),
             ("ultralytics", "nchw", torch.float32, (1, 1, 1, 1)),  # integers equal to 1
             ("conv_bias_no_bn", "nchw", torch.float32, (1, 16, 1, 1))]
    for variant, layout, dtype, shape in cases:
        m = _module(variant, shape[1], dtype, layout)
        x = _input(shape, dtype, layout)
        _step(m, x)
        _step(m, _input(shape, dtype, layout))  # other data, other allocations: same key
        if layout == "nchw":
            _step(m, _misaligned(x))  # x 1 element past a 16-byte boundary
        with torch.no_grad():  # a parameter 1 element past a 16-byte boundary
            fc1 = m.ChannelGate.mlp[1]
            fc1.weight = torch.nn.Parameter(_misaligned(fc1.weight.detach()))
        _step(m, x)

    by_key = {}
    for key, specs in records:
        by_key.setdefault(key, set()).add(specs)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    assert not clashes, f"one call key, {len(next(iter(clashes.values())))} specializations"
    # not vacuous: keys were met again, and calls of one plan that Triton specializes
    # differently (alignment) were told apart
    assert sum(1 for key, _ in records if sum(k == key for k, _ in records) > 1) >= len(cases) * 2
    per_plan = {}
    for (plan, key), specs in records:
        per_plan.setdefault(plan, set()).add(specs)
    assert sum(len(v) > 1 for v in per_plan.values()) >= len(cases) - 1


class _FakeCompiled:
    """Stands for a compiled kernel: records what its launcher is given."""

    def __init__(self, kernel, log):
        self.name, self.log = kernel.fn.__name__, log
        self.n_args = sum(not p.is_constexpr for p in _compiled_twin(kernel).params)
        self.function, self.packed_metadata = object(), object()

    def run(self, grid, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        assert (gy, gz, stream, function, metadata) == (1, 1, 0, self.function, self.packed_metadata)
        assert (launch_metadata, enter, exit_) == (None, None, None)
        self.log.append((self.name, grid, args[:self.n_args], args[self.n_args:]))


def _named(name, args, roots):
    """Each pointer argument as (index of the root it points into, byte offset)."""
    params = [p for p in _compiled_twin_by_name[name].params if not p.is_constexpr]
    out = []
    for p, a in zip(params, args):
        if not p.name.endswith("_ptr"):
            out.append(a)  # a scalar
            continue
        a = a.data_ptr() if isinstance(a, torch.Tensor) else a
        if a == 0:
            out.append("null")  # an empty region
            continue
        for i, r in enumerate(roots):
            if r is not None and r.data_ptr() <= a < r.data_ptr() + r.numel() * r.element_size():
                out.append((i, a - r.data_ptr()))
                break
        else:
            raise AssertionError(f"{name}: {p.name} {a:#x} points into no root of the call")
    return out


_compiled_twin_by_name = {}


def test_replay_passes_what_a_capturing_call_passes(monkeypatch):
    """Module A: call 1 captures, call 2 replays. Module B, a copy: calls 1 and 2 both
    capture (the plans forgotten before each). A's replay of call 2 and B's capture of
    call 2 launch the same kernels with the same grids, scalars (momentum: 1/2 after
    1/1, BatchNorm's cumulative average) and compile-time values, every pointer at the
    same place of the same root."""
    roots, log = [], []
    real_call_key = call_key

    def recording_call_key(tag, call_roots, fresh):
        roots.append((*call_roots, *fresh))
        return real_call_key(tag, call_roots, fresh)

    class RecordingCapture(Capture):
        def launch(self, kernel, grid, args, constexprs):
            kernel[grid](*args, **constexprs)
            _compiled_twin_by_name[kernel.fn.__name__] = _compiled_twin(kernel)
            log.append((kernel.fn.__name__, grid[0], args,
                        launch.constexpr_tail(kernel, constexprs)))
            return _FakeCompiled(kernel, log)

    monkeypatch.setattr(F, "call_key", recording_call_key)
    monkeypatch.setattr(F, "Capture", RecordingCapture)

    def steps(m, forget):
        runs = []
        for _ in range(2):
            if forget:
                block_plan.cache_clear()
            roots.clear()
            log.clear()
            _step(m, _input((2, 16, 4, 5), torch.bfloat16, layout))
            fwd, bwd = roots
            n_fwd = 3 if variant == "no_spatial" else 5
            runs.append([(name, grid, _named(name, args, fwd if i < n_fwd else bwd), tail)
                         for i, (name, grid, args, tail) in enumerate(log)])
        return runs

    for variant in ("official", "timm", "timm_light", "ultralytics", "no_spatial",
                    "conv_bias_no_bn"):
        for layout in ("nchw", "cl"):
            a = _module(variant, 16, torch.bfloat16, layout, bn_momentum=None)
            b = _module(variant, 16, torch.bfloat16, layout, bn_momentum=None)
            b.load_state_dict(a.state_dict())
            block_plan.cache_clear()
            captured_a, replayed_a = steps(a, forget=False)
            captured_b1, captured_b2 = steps(b, forget=True)
            assert len(replayed_a) == len(captured_b2) in (7, 12)
            assert captured_a == captured_b1
            for replayed, captured in zip(replayed_a, captured_b2):
                assert replayed == captured, f"{variant} {layout}: {captured[0]}"
            if "spatial_bn" not in VARIANTS[variant] and variant != "no_spatial":
                # BatchNorm in training: the second call's momentum reached the replay
                first, second = ([r for r in run if r[0] == "_gate_apply_kernel"][0]
                                 for run in (captured_a, replayed_a))
                assert first[2][-2:] == [1.0, 0.0] and second[2][-2:] == [0.5, 0.0]  # mom_hi, mom_lo


def test_program_slots():
    from cbam_fused.launch import _slot
    ptr, scalar, eps = (type("P", (), dict(name=n)) for n in ("a_ptr", "C", "eps_hi"))
    base = torch.zeros(64)
    other = torch.zeros(8)
    roots = (None, base, other)
    ptrs = [0, base.data_ptr(), other.data_ptr()]
    assert _slot(ptr, base, roots, ptrs) == (1, 0)
    assert _slot(ptr, base[3:], roots, ptrs) == (1, 12)
    assert _slot(ptr, base.data_ptr() + 40, roots, ptrs) == (1, 40)  # an address
    assert _slot(ptr, other, roots, ptrs) == (2, 0)
    assert _slot(ptr, base[:0], roots, ptrs) in ((1, 0), (-1, 0))
    assert _slot(ptr, torch.zeros(4), roots, ptrs) is None  # no root: nothing bound
    assert _slot(scalar, 784, roots, ptrs) == (-1, 784)
    assert _slot(eps, 1e-5, roots, ptrs) == (-2, "eps_hi")


def test_call_key_is_dtypes_and_addresses_modulo_16():
    base = torch.zeros(64, dtype=torch.float32)
    assert base.data_ptr() % 16 == 0
    key, ptrs = call_key("t", (base, base[1:], None, base.view(torch.int32)))
    assert key == ("t", (torch.float32, torch.float32, None, torch.int32), (0, 4, 0, 0))
    assert ptrs == [base.data_ptr(), base.data_ptr() + 4, 0, base.data_ptr()]
    assert call_key("t", (base[4:],))[0] == call_key("t", (base,))[0]
    # fresh allocations: addresses after the roots', nothing in the key
    other = torch.zeros(8, dtype=torch.float64)
    key2, ptrs2 = call_key("t", (base,), (other, None))
    assert key2 == call_key("t", (base,))[0]
    assert ptrs2 == [base.data_ptr(), other.data_ptr(), 0]


def test_capture_binds_nothing_when_a_fresh_root_is_misaligned():
    base = torch.zeros(64, dtype=torch.float32)
    for fresh, bound in (((base[4:],), True), ((base[1:],), False)):
        key, ptrs = call_key("t", (base,), fresh)
        assert (Capture(key, (base, *fresh), ptrs, 1).program() is not None) == bound


def test_fast_launch_is_opt_in_and_cuda_only(monkeypatch):
    monkeypatch.delenv(launch.FAST_LAUNCH_ENV, raising=False)
    assert not launch.fast_launch_requested()
    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "1")
    assert launch.fast_launch_requested()
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    assert not use_fast_launch(torch.zeros(1))  # CPU tensors: the interpreter's JIT path
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    assert not use_fast_launch(torch.zeros(1))
