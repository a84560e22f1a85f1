"""The fused CBAM block as one torch.autograd.Function, and the functional entry point.

Forward (DESIGN.md section 4): F1 channel stats, phi, F2 spatial stats of x*ca,
psi, F3 out = x*ca*sa: three passes over x, 4|x| of traffic.
Backward (section 5): B1, B2, B3, 5|x| of traffic; phi and psi are differentiated
by autograd on their small graphs, recomputed from the saved pooled statistics.
Saved for backward: x, plus O(N*C + N*H*W) statistics (never y = x*ca).
"""
import os

import torch

from . import launchers as L
from .maps import channel_logits, spatial_logits
from .reference import cbam_reference
from .spec import NUM_TENSOR_FIELDS, CBAMSpec, CBAMWeights
from .validation import check_inputs


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether x goes through the Triton kernels (CUDA, or CPU under the interpreter)."""
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreter_active())


def _detached(t, *, grad: bool):
    if t is None:
        return None
    return t.detach().requires_grad_(grad and t.requires_grad)


class CBAMFunction(torch.autograd.Function):
    """apply(x, spec, bn_training, bn_momentum, *weight_tensors, has_bn)"""

    @staticmethod
    def forward(ctx, x, spec: CBAMSpec, bn_training: bool, bn_momentum: float, *weights):
        w = CBAMWeights(*weights)
        N, C, H, W = x.shape
        P = H * W
        xd, p_contig = L.dense_layout(x)
        csum, cmax, cidx, ccnt = L.channel_stats(xd, p_contig)
        avg = csum / P
        ca = torch.sigmoid(channel_logits(spec, avg, cmax, w))
        sa = smean = smax = sidx = scnt = None
        if spec.has_spatial:
            ssum, smax, sidx, scnt = L.spatial_stats(xd, ca, p_contig)
            smean = ssum / C
            u = spatial_logits(spec, smean.view(N, 1, H, W), smax.view(N, 1, H, W), w,
                               bn_training=bn_training, bn_momentum=bn_momentum,
                               update_running_stats=True)
            sa = torch.sigmoid(u).view(N, P)
        out = L.gate_apply(xd, ca, sa, p_contig)

        ctx.spec, ctx.bn_training, ctx.bn_momentum = spec, bn_training, bn_momentum
        ctx.p_contig, ctx.has_bn = p_contig, w.has_bn
        saved = list(w[:NUM_TENSOR_FIELDS])
        if bn_training:
            # Batch statistics are recomputed; running stats are not read in backward, and
            # a second forward may update them in place before this backward runs.
            saved[-2] = saved[-1] = None
        ctx.save_for_backward(xd, ca, sa, avg, cmax, cidx, ccnt, smean, smax, sidx, scnt, *saved)
        return out

    @staticmethod
    def backward(ctx, g):
        (xd, ca, sa, avg, cmax, cidx, ccnt, smean, smax, sidx, scnt,
         *saved) = ctx.saved_tensors
        spec, p_contig = ctx.spec, ctx.p_contig
        N, C, H, W = xd.shape
        g = L.as_layout(g, p_contig)
        w = CBAMWeights(*[_detached(t, grad=True) for t in saved], ctx.has_bn)
        grads = dict.fromkeys(CBAMWeights._fields[:NUM_TENSOR_FIELDS])

        gs, gc = L.bwd_gate_sums(g, xd, ca, sa, p_contig)
        dsmean = dsmax = None
        if spec.has_spatial:
            smean_ = smean.view(N, 1, H, W).detach().requires_grad_()
            smax_ = smax.view(N, 1, H, W).detach().requires_grad_()
            with torch.enable_grad():
                sa_ = torch.sigmoid(spatial_logits(
                    spec, smean_, smax_, w, bn_training=ctx.bn_training,
                    bn_momentum=ctx.bn_momentum, update_running_stats=False))
            dsmean, dsmax = _grad(sa_, gs.view_as(sa_), [smean_, smax_], w, grads,
                                  ("conv_weight", "conv_bias", "bn_weight", "bn_bias"))
            dsmean, dsmax = dsmean.view(N, H * W), dsmax.view(N, H * W)
            gc = gc + L.bwd_spatial_pool(xd, ca, dsmean, dsmax, smax, sidx, scnt,
                                         p_contig, spec.amax)

        avg_ = avg.detach().requires_grad_()
        cmax_ = cmax.detach().requires_grad_()
        with torch.enable_grad():
            ca_ = torch.sigmoid(channel_logits(spec, avg_, cmax_, w))
        davg, dmx = _grad(ca_, gc, [avg_, cmax_], w, grads,
                          ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))

        dx = None
        if ctx.needs_input_grad[0]:
            dx = L.bwd_input(g, xd, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx,
                             cmax, cidx, ccnt, p_contig, spec.amax)
        return (dx, None, None, None, *grads.values(), None)


def _grad(output, grad_output, inputs, w: CBAMWeights, grads: dict, names):
    """d(output)/d(inputs) and, into grads, d(output)/d(w.<name>) for weights that need it.

    Unused inputs (e.g. the max pool of a variant that pools avg only) get zeros.
    """
    params = [(n, getattr(w, n)) for n in names if getattr(w, n) is not None and getattr(w, n).requires_grad]
    res = torch.autograd.grad(output, inputs + [p for _, p in params], grad_output, allow_unused=True)
    for (n, _), r in zip(params, res[len(inputs):]):
        grads[n] = r
    return [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res[:len(inputs)])]


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
                   bn_momentum: float):
    """`cbam` after check_inputs has passed."""
    if x.shape[0] == 0:
        return x.clone()  # an empty batch: nothing to compute, no launch
    if not uses_kernels(x):
        return cbam_reference(x, spec, weights, bn_training=bn_training, bn_momentum=bn_momentum)
    return CBAMFunction.apply(x, spec, bn_training, bn_momentum, *weights)
