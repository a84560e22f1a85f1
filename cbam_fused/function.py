"""The fused CBAM block as one torch.autograd.Function, and the functional entry point.

Forward (docs/design.md sections 4 and 8), five launches:
    F1   channel statistics of x, split partials            (pool_stats.py)
    phi  combine, MLP, sigmoid -> ca                         (channel_gate.py)
    F2   spatial statistics of x*ca, split partials          (pool_stats.py)
    psi  combine, k x k conv, BatchNorm moments or sa        (spatial_gate.py)
    F3   [BatchNorm finalize ->] sa, out = x*ca*sa           (gate_apply.py)
Backward (section 5), seven launches:
    B1   Gs and Gc1 partials                                 (backward.py)
    psi  ds and BatchNorm sums; then du, dsmean, dsmax, conv gradient rows (spatial_gate.py)
    B2   Gc2                                                 (backward.py)
    phi  dlogits, dh, davg, dmx                              (channel_gate.py)
    W    every parameter gradient                            (weight_grads.py)
    B3   dx                                                  (backward.py)
4|x| of big-tensor traffic forward, 5|x| backward; everything else works on N x C and
N x H x W rows in one saved workspace (kept for the backward, with x) and one scratch
workspace per direction. No torch op launches device work between the kernels; there is
no host synchronization and no allocation whose size depends on data, so CUDA graphs
can capture a call. A SyncBatchNorm adds one small kernel and one all_gather per
direction (sync_bn.py).
"""
import functools
import os

import torch

from . import launchers as L
from .launch import Capture, call_key, current_stream, jit_launch, use_fast_launch
from .ops import OPS
from .plan import block_plan, carve, sm_count_of
from .reference import cbam_reference
from .second_order import differentiable_backward
from .spec import NUM_TENSOR_FIELDS, CBAMSpec, CBAMWeights
from .sync_bn import gather_rows
from .validation import check_inputs


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Read once, at import: triton.jit reads the variable when it decorates the kernels (the
# import of kernels/ above), so whether they run interpreted is fixed from then on.
_KERNELS_INTERPRETED = triton_interpreter_active()


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether x goes through the Triton kernels (CUDA, or CPU under the interpreter) when
    nothing asks for plain PyTorch ops instead (see `plain_ops_reason`)."""
    return x.is_cuda or (_KERNELS_INTERPRETED and x.is_cpu)


def _functorch_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, jvp, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def plain_ops_reason():
    """Why this call must be expressed in plain PyTorch ops (the reference) rather than the
    fused kernels, or None. The fused block is opaque to tools that record or transform
    the operations of a forward:
    - torch.jit.trace and the TorchScript-based torch.onnx.export record the ops a
      forward runs (a Triton launch records nothing they can replay or export);
    - torch.onnx.export(dynamo=True) captures the program with torch.export and then
      needs an ONNX translation of every op: plain ops have one;
    - torch.func transforms (vmap, grad, ...) run each op through their own rules.
    torch.compile and plain torch.export keep the fused op (a registered operator with
    a fake implementation; ops.py). The reference gives the same numbers (every test
    holds both to the float64 formulas) and the same module state updates."""
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
            return "torch.onnx.export"
        return None
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if _functorch_active():
        return "torch.func transform"
    return None


def dense_weights(w: CBAMWeights) -> CBAMWeights:
    """w with every tensor contiguous: the kernels index the small maps' weights as dense
    row-major arrays. A module moved to channels_last holds its k x k conv weight with
    strides (2k^2, 1, 2k, 2), a parameter can be any strided view; such a weight is
    copied (a few hundred bytes, differentiable, so its gradient reaches the parameter)."""
    for t in w[:NUM_TENSOR_FIELDS]:
        if t is not None and not t.is_contiguous():
            return w._replace(**{name: t.contiguous() for name, t in w.tensors()
                                 if not t.is_contiguous()})
    return w


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast asks for on x's device, or None when autocast is off there."""
    kind = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def plan_for(x: torch.Tensor, spec: CBAMSpec, w: CBAMWeights, p_contig: bool):
    """The cached launch plan of this call (plan.py)."""
    N, C, H, W = x.shape
    two_layers = w.fc2_weight is not None
    hidden = w.fc1_weight.shape[0] if two_layers else C
    return block_plan(N, C, H, W, hidden, two_layers, spec.has_spatial, spec.kernel_size,
                      p_contig, x.dtype, sm_count_of(x))


def _bound_launches(plan, xd, group, tag, roots, fresh, floats=None):
    """The fast launch path of one block call (launch.py): (True, None) when it replayed the
    program bound to this call's plan and key, else (False, run) with `run` the callable
    its launchers take: a Capture to bind on this call (fast path), or the JIT launch.
    roots: the tensors the caller passed in (input, weights, saved workspaces); fresh: the
    ones this call allocated (workspaces, outputs), outside the key (launch.call_key)."""
    if group is not None or not use_fast_launch(xd):
        return False, jit_launch
    key, ptrs = call_key((tag, xd.get_device()), roots, fresh)
    program = plan.launch_handles.get(key)
    if program is not None:
        program.replay(ptrs, current_stream(xd), floats() if floats else None)
        return True, None
    return False, Capture(key, (*roots, *fresh), ptrs, len(roots))


def _bind(plan, run):
    """After a call that captured: keep its program for the later calls of its key."""
    if isinstance(run, Capture):
        program = run.program()
        if program is not None:
            plan.launch_handles[run.key] = program


@functools.lru_cache(maxsize=64)
def _float_args(eps: float, momentum: float):
    """The forward kernels' float arguments by name (launch.FLOAT_ARGS); a replay only
    reads the dict."""
    eps_hi, eps_lo = L.f64_pair(eps)
    mom_hi, mom_lo = L.f64_pair(momentum)
    return dict(eps_hi=eps_hi, eps_lo=eps_lo, mom_hi=mom_hi, mom_lo=mom_lo)


def fused_forward(xd, p_contig: bool, spec: CBAMSpec, w: CBAMWeights, bn_batch_stats: bool,
                  momentum: float, group=None, plan=None):
    """The five forward launches on xd (dense in the layout p_contig says). plan: this
    call's plan_for, when the caller has it.

    Returns (out, saved_acc, saved_i32): the two saved workspaces hold what the backward
    needs besides x (pooled statistics, gates, conv output, BatchNorm statistics)."""
    if plan is None:
        plan = plan_for(xd, spec, w, p_contig)
    f = L.flags_of(spec, w, bn_batch_stats)
    dev, acc = xd.device, plan.acc
    sizes = plan.sizes
    saved_acc = torch.empty(sizes["saved_acc_layout"], device=dev, dtype=acc)
    saved_i32 = torch.empty(sizes["saved_i32_layout"], device=dev, dtype=torch.int32)
    scratch = torch.empty(sizes["fwd_scratch_layout"], device=dev, dtype=acc)
    out = torch.empty_like(xd)
    replayed, run = _bound_launches(
        plan, xd, group, ("fwd", f),
        (xd, *w[:NUM_TENSOR_FIELDS]), (saved_acc, saved_i32, scratch, out),
        lambda: _float_args(spec.bn_eps, momentum))
    if replayed:
        return out, saved_acc, saved_i32
    s = carve(saved_acc, plan.saved_acc_layout())
    s.update(carve(saved_i32, plan.saved_i32_layout()))
    t = carve(scratch, plan.fwd_scratch_layout())
    t.update(carve(t.pop("i32").view(torch.int32), plan.fwd_scratch_i32_layout()))
    C, P = plan.C, plan.P

    L.pool_stats_partials(xd, C, P, p_contig, plan.f1,
                          outs=(t["f1_sum"], t["f1_max"], t["f1_idx"], t["f1_cnt"]),
                          hid_partial=L.f1_hid_partial(plan, f, w, t), run=run)
    L.channel_gate_fwd(plan, f, w, t, s, run=run)
    if not spec.has_spatial:
        L.gate_apply(xd, s["ca"], p_contig, eps=spec.bn_eps, momentum=momentum, out=out,
                     plan=plan, run=run)
    else:
        L.pool_stats_partials(xd, P, C, not p_contig, plan.f2, scale=s["ca"],
                              outs=(t["f2_sum"], t["f2_max"], t["f2_idx"], t["f2_cnt"]), run=run)
        L.spatial_gate_fwd(plan, f, w, t, s, spec.bn_eps, run=run)
        if f.bn_mode != 2:
            L.gate_apply(xd, s["ca"], p_contig, sa=s["sa"], eps=spec.bn_eps, momentum=momentum,
                         out=out, plan=plan, run=run)
        else:
            mom, num_parts = t["mom"], plan.psi_programs
            if group is not None:
                mom, num_parts = gather_rows(L.bn_partials_reduce(mom, num_parts, moments=True),
                                             group)
            L.gate_apply(xd, s["ca"], p_contig, w=w, sa=s["sa"], u=s["u"], mom=mom,
                         num_parts=num_parts, bn_stats=s["bn_stats"], eps=spec.bn_eps,
                         momentum=momentum, track=True, out=out, plan=plan, run=run)
    _bind(plan, run)
    return out, saved_acc, saved_i32


def fused_backward(g, xd, p_contig: bool, saved_acc, saved_i32, spec: CBAMSpec, w: CBAMWeights,
                   bn_batch_stats: bool, need_dx: bool, group=None, plan=None):
    """The seven backward launches: (dx or None, {weight field: gradient}). plan: as in
    fused_forward."""
    if plan is None:
        plan = plan_for(xd, spec, w, p_contig)
    f = L.flags_of(spec, w, bn_batch_stats)
    scratch = torch.empty(plan.bwd_scratch_size(spec.kernel_size, f.spatial_maps),
                          device=xd.device, dtype=plan.acc)
    g = L.as_layout(g, p_contig)
    dx = torch.empty_like(g) if need_dx else None
    grads = L.empty_weight_grads(w)
    replayed, run = _bound_launches(
        plan, xd, group, ("bwd", f, need_dx),
        (g, xd, *w[:len(L.GRAD_FIELDS)], saved_acc, saved_i32), (scratch, dx, *grads.values()))
    if replayed:
        return dx, grads
    s = carve(saved_acc, plan.saved_acc_layout())
    s.update(carve(saved_i32, plan.saved_i32_layout()))
    t = carve(scratch, plan.bwd_scratch_layout(spec.kernel_size, f.spatial_maps))
    sa = s["sa"] if spec.has_spatial else None
    L.bwd_gate_sums(g, xd, s["ca"], sa, p_contig, gs_part=t["gs_part"] if spec.has_spatial else None,
                    gc_part=t["gc_part"], plan=plan, run=run)
    dsmean = dsmax = smax = sidx = scnt = None
    if spec.has_spatial:
        L.spatial_gate_bwd_stats(plan, f, s, t, run=run)
        sums, num_parts = t["bsums"], plan.psi_programs
        if group is not None and f.bn_mode == 2:
            sums, num_parts = gather_rows(L.bn_partials_reduce(sums, num_parts, moments=False),
                                          group)
        L.spatial_gate_bwd(plan, f, w, s, t, sums, num_parts, run=run)
        dsmean, dsmax, smax, sidx, scnt = t["dsmean"], t["dsmax"], s["smax"], s["sidx"], s["scnt"]
        L.bwd_spatial_pool(xd, s["ca"], dsmean, dsmax, smax, sidx, scnt, p_contig, spec.amax,
                           out=t["gc2_part"], plan=plan, dr_partial=L.b2_dr_partial(plan, w, t),
                           run=run)
    L.channel_gate_bwd(plan, f, w, s, t, run=run)
    L.weight_grads(plan, f, w, s, t, grads=grads, run=run)
    if need_dx:
        L.bwd_input(g, xd, s["ca"], sa, dsmean, dsmax, smax, sidx, scnt, t["davg"], t["dmx"],
                    s["cmax"], s["cidx"], s["ccnt"], p_contig, spec.amax, dx=dx, plan=plan, run=run)
    _bind(plan, run)
    return dx, grads


def report_gates(gates, xd, p_contig: bool, spec: CBAMSpec, w: CBAMWeights, saved_acc,
                 plan=None):
    """Hand the gates of a forward to `gates(ca, sa or None, shape)` (attention.py): views
    of the saved workspace, where the kernels left them."""
    if plan is None:
        plan = plan_for(xd, spec, w, p_contig)
    views = carve(saved_acc, plan.saved_acc_layout())
    gates(views["ca"], views["sa"] if spec.has_spatial else None, tuple(xd.shape))


class DIRECT:
    """The registered ops' implementation called without the dispatcher (eager): the
    same code (ops.py), minus the microseconds of host time the dispatcher costs."""
    block_forward = staticmethod(fused_forward)
    block_backward = staticmethod(fused_backward)


def passes():
    """The registered ops while torch.compile traces, the direct implementation otherwise."""
    return OPS if torch.compiler.is_compiling() else DIRECT


_TENSOR_FIELDS = CBAMWeights._fields[:NUM_TENSOR_FIELDS]
# the parameters lead the weight fields; the BatchNorm buffers (updated in place by the
# forward, not read by the backward) follow
_NUM_PARAMS = len(L.GRAD_FIELDS)
assert _TENSOR_FIELDS[:_NUM_PARAMS] == L.GRAD_FIELDS
_NO_BUFFERS = (None,) * (NUM_TENSOR_FIELDS - _NUM_PARAMS)


class CBAMFunction(torch.autograd.Function):
    """apply(x, spec, bn_batch_stats, momentum, group, gates, buffers, *params, has_bn) -> out.

    params: the eight parameter fields of CBAMWeights (fc1_weight ... bn_bias, None where
    absent), the only weight tensors autograd sees. buffers: the BatchNorm buffers
    (bn_running_mean, bn_running_var, bn_num_batches_tracked), as one tuple: autograd
    neither differentiates nor saves them, and it would check, wrap and give an edge to
    every tensor argument (host time in apply and in the engine's backward). In
    batch-statistics mode the forward updates them in place.
    group: the process group of a synchronized (SyncBatchNorm) spatial BatchNorm, or
    None. gates: None, or a callable that receives the gates (attention.py).
    """

    @staticmethod
    def forward(ctx, x, spec: CBAMSpec, bn_batch_stats: bool, momentum: float, group, gates,
                buffers, *params_and_has_bn):
        w = CBAMWeights(*params_and_has_bn[:-1], *buffers, params_and_has_bn[-1])
        xd, p_contig = L.dense_layout(x)
        if torch.compiler.is_compiling():  # the registered op; its backward plans for itself
            plan = None
            out, saved_acc, saved_i32 = OPS.block_forward(xd, p_contig, spec, w, bn_batch_stats,
                                                          momentum, group)
        else:  # one plan lookup for the forward and the backward
            plan = plan_for(xd, spec, w, p_contig)
            out, saved_acc, saved_i32 = fused_forward(xd, p_contig, spec, w, bn_batch_stats,
                                                      momentum, group, plan)
        if gates is not None:
            report_gates(gates, xd, p_contig, spec, w, saved_acc, plan)
        ctx.plan = plan
        ctx.spec, ctx.bn_batch_stats, ctx.p_contig, ctx.group = spec, bn_batch_stats, p_contig, group
        ctx.dense_copy = xd is not x
        ctx.has_bn = w.has_bn
        # The parameters, not the BatchNorm buffers: the backward reads the statistics the
        # forward used from saved_acc (a later forward may update the buffers in place).
        # x itself, not its dense copy (the same tensor unless x has other strides): a
        # differentiable backward (second_order.py) must reach x through the graph. The
        # backward makes the copy again rather than keep both.
        ctx.save_for_backward(x, saved_acc, saved_i32, *w[:_NUM_PARAMS])
        return out

    @staticmethod
    def backward(ctx, g):
        x, saved_acc, saved_i32, *params = ctx.saved_tensors
        w = CBAMWeights(*params, *_NO_BUFFERS, ctx.has_bn)
        needs = ctx.needs_input_grad[_FIRST_PARAM_ARG:_FIRST_PARAM_ARG + _NUM_PARAMS]
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not compiling:
            # create_graph=True: the caller differentiates this backward (second_order.py)
            fields = [n for n, need in zip(L.GRAD_FIELDS, needs) if need]
            dx, grads = differentiable_backward(
                g, x, saved_acc,
                ctx.plan if ctx.plan is not None else plan_for(x, ctx.spec, w, ctx.p_contig),
                ctx.spec, w, ctx.bn_batch_stats, ctx.group, ctx.needs_input_grad[0], fields)
        else:
            # (a Python flag, not a look at x's strides: torch.compile traces this backward
            # with tensors whose strides it treats as unknown)
            xd = x.contiguous() if ctx.dense_copy else x  # dense_layout's copy
            args = (g, xd, ctx.p_contig, saved_acc, saved_i32, ctx.spec, w, ctx.bn_batch_stats,
                    ctx.needs_input_grad[0], ctx.group)
            if compiling or ctx.plan is None:  # (compiled autograd)
                dx, grads = passes().block_backward(*args)
            else:
                dx, grads = fused_backward(*args, plan=ctx.plan)
        return (dx, None, None, None, None, None, None,
                *[grads.get(name) if need else None for name, need in zip(L.GRAD_FIELDS, needs)],
                None)


# apply's arguments before the parameters: x, spec, bn_batch_stats, momentum, group, gates,
# buffers
_FIRST_PARAM_ARG = 7


def apply_block(x, spec: CBAMSpec, w: CBAMWeights, bn_batch_stats: bool, momentum: float,
                group=None, gates=None):
    """CBAMFunction.apply with the weights split into parameters and buffers."""
    return CBAMFunction.apply(x, spec, bn_batch_stats, momentum, group, gates,
                              w[_NUM_PARAMS:NUM_TENSOR_FIELDS], *w[:_NUM_PARAMS], w.has_bn)


def cbam(x: torch.Tensor, spec: CBAMSpec, weights: CBAMWeights, *, bn_training: bool = False,
         bn_momentum: float = 0.1) -> torch.Tensor:
    """Functional fused CBAM: out = x * sigmoid(phi(pools(x))) * sigmoid(psi(pools(x * ca))).

    bn_training selects batch statistics in the spatial BatchNorm and updates the
    running statistics (if weights has them) with factor bn_momentum, in place, and the
    batch counter (if weights has one). On CUDA tensors, and on CPU tensors under
    TRITON_INTERPRET=1, the Triton kernels run; on other CPU tensors the plain PyTorch
    reference runs.
    """
    check_inputs(x, spec, weights, bn_training)
    return cbam_unchecked(x, spec, weights, bn_training=bn_training, bn_momentum=bn_momentum)


def _count_batch_on_host(weights: CBAMWeights, bn_training: bool):
    if bn_training and weights.has_bn and weights.bn_num_batches_tracked is not None:
        weights.bn_num_batches_tracked.add_(1)


def cbam_unchecked(x, spec: CBAMSpec, weights: CBAMWeights, *, bn_training: bool,
                   bn_momentum: float, bn_group=None, gates=None):
    """`cbam` after check_inputs has passed.

    Under torch.autocast a float32 input runs in the autocast dtype (as a convolution
    would), and the output has that dtype. bn_group: synchronize the spatial BatchNorm's
    batch statistics over this process group (SyncBatchNorm), see sync_bn.py. gates:
    called with the gates of this forward (attention.py).
    """
    if x.shape[0] == 0:
        _count_batch_on_host(weights, bn_training)
        return x.clone()  # an empty batch: nothing to compute, no launch
    cast = autocast_dtype(x)
    if cast is not None and x.dtype == torch.float32:
        x = x.to(cast)
    kernels = uses_kernels(x)
    plain_reason = plain_ops_reason() if kernels else None
    if plain_reason is not None:
        kernels = False
    if not kernels and bn_group is not None:
        raise NotImplementedError(
            "cbam_fused: a synchronized (SyncBatchNorm) spatial BatchNorm needs the fused "
            "path: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
            + (f", outside {plain_reason}" if plain_reason else ""))
    bn_batch_stats = bool(bn_training and weights.has_bn and spec.has_spatial)
    momentum = float(bn_momentum)
    if not kernels:
        _count_batch_on_host(weights, bn_training)
        with torch.autocast(x.device.type, enabled=False):  # x already has the autocast dtype
            return cbam_reference(x, spec, weights, bn_training=bn_training,
                                  bn_momentum=bn_momentum, gates=gates)
    # the kernel path runs no op that autocast would cast: no autocast context needed
    weights = dense_weights(weights)
    if not bn_batch_stats:  # the counter is only touched by the batch-statistics kernel
        _count_batch_on_host(weights, bn_training)
    if torch.is_grad_enabled() and (x.requires_grad or any(
            t is not None and t.requires_grad for t in weights[:NUM_TENSOR_FIELDS])):
        return apply_block(x, spec, weights, bn_batch_stats, momentum, bn_group, gates)
    xd, p_contig = L.dense_layout(x)  # no_grad / inference_mode: no autograd node
    out, saved_acc, _ = passes().block_forward(xd, p_contig, spec, weights, bn_batch_stats,
                                               momentum, bn_group)
    if gates is not None:
        report_gates(gates, xd, p_contig, spec, weights, saved_acc)
    return out
