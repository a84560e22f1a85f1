"""The fused CBAM block as one torch.autograd.Function, and the functional entry point.

Forward (DESIGN.md section 4): F1 channel stats, phi, F2 spatial stats of x*ca,
psi, F3 out = x*ca*sa: three passes over x, 4|x| of traffic.
Backward (section 5): B1, B2, B3, 5|x| of traffic; phi and psi have hand-written
backwards (maps.py) on their small saved intermediates.
Saved for backward: x, plus O(N*C + N*H*W) statistics (never y = x*ca).

Everything here is traceable by torch.compile (fullgraph): the big passes are the
registered ops of ops.py, the rest are aten ops, there is no host synchronization and
no allocation whose size depends on data, so CUDA graphs can capture it too.
"""
import os

import torch

from . import launchers as L
from .maps import (channel_backward, channel_forward, spatial_backward, spatial_forward,
                   update_running_stats)
from .ops import passes
from .reference import cbam_reference
from .spec import NUM_TENSOR_FIELDS, CBAMSpec, CBAMWeights
from .validation import check_inputs


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether x goes through the Triton kernels (CUDA, or CPU under the interpreter)."""
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreter_active())


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast asks for on x's device, or None when autocast is off there."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def fused_forward(x, spec: CBAMSpec, w: CBAMWeights, bn_batch_stats: bool, group=None):
    """The forward passes. Returns (out, saved, batch): saved holds what the backward
    needs (x plus O(N*C + N*H*W) statistics), batch the spatial BatchNorm's batch
    (mean, var) for the running-statistic update, or None."""
    ops = passes()
    N, C, H, W = x.shape
    P = H * W
    xd, p_contig = L.dense_layout(x)
    csum, cmax, cidx, ccnt = ops.channel_stats(xd, p_contig)
    avg = csum / P
    logits, h = channel_forward(spec, avg, cmax, w)
    ca = torch.sigmoid(logits)
    sa = smean = smax = sidx = scnt = batch = None
    sp_saved = (None,) * 3
    if spec.has_spatial:
        ssum, smax, sidx, scnt = ops.spatial_stats(xd, ca, p_contig)
        smean = ssum / C
        u, sp_saved, batch = spatial_forward(spec, smean.view(N, 1, H, W),
                                             smax.view(N, 1, H, W), w,
                                             bn_batch_stats=bn_batch_stats, group=group)
        sa = torch.sigmoid(u).view(N, P)
    out = ops.gate_apply(xd, ca, sa, p_contig)
    saved = (xd, ca, sa, avg, cmax, cidx, ccnt, h, smean, smax, sidx, scnt, *sp_saved)
    return out, (saved, p_contig), batch


def fused_backward(g, spec: CBAMSpec, w: CBAMWeights, saved, p_contig: bool,
                   bn_batch_stats: bool, want, need_dx: bool, group=None):
    """The backward passes: (dx or None, {weight field: gradient})."""
    ops = passes()
    (xd, ca, sa, avg, cmax, cidx, ccnt, h, smean, smax, sidx, scnt, *sp_saved) = saved
    N, C, H, W = xd.shape
    g = L.as_layout(g, p_contig)
    gs, gc = ops.bwd_gate_sums(g, xd, ca, sa, p_contig)
    dsmean = dsmax = None
    grads = {}
    if spec.has_spatial:
        ds = (gs * (sa * (1 - sa))).view(N, 1, H, W)
        dsmean, dsmax, grads = spatial_backward(spec, ds, smean.view(N, 1, H, W),
                                                smax.view(N, 1, H, W), sp_saved, w, want,
                                                bn_batch_stats=bn_batch_stats, group=group)
        dsmean, dsmax = dsmean.reshape(N, H * W), dsmax.reshape(N, H * W)
        gc = gc + ops.bwd_spatial_pool(xd, ca, dsmean, dsmax, smax, sidx, scnt, p_contig,
                                       spec.amax)
    davg, dmx, ch_grads = channel_backward(spec, gc * (ca * (1 - ca)), avg, cmax, h, w, want)
    grads.update(ch_grads)
    dx = None
    if need_dx:
        dx = ops.bwd_input(g, xd, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx,
                           cmax, cidx, ccnt, p_contig, spec.amax)
    return dx, grads


class CBAMFunction(torch.autograd.Function):
    """apply(x, spec, bn_batch_stats, group, *weight_tensors, has_bn) -> (out, bn_mean, bn_var).

    group: the process group of a synchronized (SyncBatchNorm) spatial BatchNorm, or
    None. bn_mean and bn_var are the spatial BatchNorm's batch mean and unbiased
    variance (empty tensors when not used), returned so the caller updates the running
    statistics outside the autograd graph; they are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, spec: CBAMSpec, bn_batch_stats: bool, group, *weights):
        w = CBAMWeights(*weights)
        out, (saved, p_contig), batch = fused_forward(x, spec, w, bn_batch_stats, group)
        ctx.spec, ctx.bn_batch_stats, ctx.p_contig = spec, bn_batch_stats, p_contig
        ctx.group = group
        ctx.has_bn = w.has_bn
        params = list(w[:NUM_TENSOR_FIELDS])
        # The backward reads running statistics only from the copy psi saved in eval
        # mode; they are not saved here, since a later forward may update them in place.
        params[-2] = params[-1] = None
        ctx.save_for_backward(*saved, *params)
        mean, var = batch if batch is not None else (x.new_empty(0), x.new_empty(0))
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, g, _gmean, _gvar):
        *saved, = ctx.saved_tensors
        n_saved = len(saved) - NUM_TENSOR_FIELDS
        w = CBAMWeights(*saved[n_saved:], ctx.has_bn)
        want = {name for name, need in zip(CBAMWeights._fields[:NUM_TENSOR_FIELDS],
                                             ctx.needs_input_grad[4:]) if need}
        dx, grads = fused_backward(g, ctx.spec, w, saved[:n_saved], ctx.p_contig,
                                   ctx.bn_batch_stats, want, ctx.needs_input_grad[0], ctx.group)
        return (dx, None, None, None,
                *[grads.get(name) for name in CBAMWeights._fields[:NUM_TENSOR_FIELDS]], None)


def cbam(x: torch.Tensor, spec: CBAMSpec, weights: CBAMWeights, *, bn_training: bool = False,
         bn_momentum: float = 0.1) -> torch.Tensor:
    """Functional fused CBAM: out = x * sigmoid(phi(pools(x))) * sigmoid(psi(pools(x * ca))).

    bn_training selects batch statistics in the spatial BatchNorm and updates the
    running statistics (if weights has them) with factor bn_momentum, in place.
    On CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1, the Triton kernels
    run; on other CPU tensors the plain PyTorch reference runs.
    """
    check_inputs(x, spec, weights, bn_training)
    return cbam_unchecked(x, spec, weights, bn_training=bn_training, bn_momentum=bn_momentum)


def cbam_unchecked(x, spec: CBAMSpec, weights: CBAMWeights, *, bn_training: bool,
                   bn_momentum: float, bn_group=None):
    """`cbam` after check_inputs has passed.

    Under torch.autocast a float32 input runs in the autocast dtype (as a convolution
    would), and the output has that dtype. bn_group: synchronize the spatial BatchNorm's
    batch statistics over this process group (SyncBatchNorm), see sync_bn.py.
    """
    if x.shape[0] == 0:
        return x.clone()  # an empty batch: nothing to compute, no launch
    cast = autocast_dtype(x)
    if cast is not None and x.dtype == torch.float32:
        x = x.to(cast)
    if not uses_kernels(x) and bn_group is not None:
        raise NotImplementedError(
            "cbam_fused: a synchronized (SyncBatchNorm) spatial BatchNorm needs the fused "
            "path: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    bn_batch_stats = bn_training and weights.has_bn
    with torch.autocast(x.device.type, enabled=False):  # x already has the autocast dtype
        if not uses_kernels(x):
            return cbam_reference(x, spec, weights, bn_training=bn_training,
                                  bn_momentum=bn_momentum)
        needs_grad = x.requires_grad or any(t.requires_grad for _, t in weights.tensors())
        if torch.is_grad_enabled() and needs_grad:
            out, mean, var = CBAMFunction.apply(x, spec, bn_batch_stats, bn_group, *weights)
            batch = (mean, var) if bn_batch_stats else None
        else:  # no_grad / inference_mode: no autograd node, nothing saved
            out, _, batch = fused_forward(x, spec, weights, bn_batch_stats, bn_group)
    update_running_stats(weights, batch, bn_momentum)
    return out
