"""The backward of a block when the caller builds a graph through it (create_graph=True).

Gradient penalties, Hessian-vector products and meta-learning differentiate the gradient
itself. The fused backward kernels compute the first-order gradient but are not
differentiable, so when autograd asks for a differentiable backward the block recomputes
its forward from the saved inputs in plain PyTorch ops (cbam_fused.reference) and takes
the gradient of that with create_graph=True. The values equal the kernels' first-order
gradient to rounding, and their own gradient is exact.

The recomputation must see the same function the forward computed:
- BatchNorm in batch-statistics mode normalizes by the statistics of this batch again
  (recomputed from u, so they are differentiated too), without touching the running
  statistics, which the forward has already updated;
- BatchNorm in eval mode normalizes by the statistics the forward used, read from the
  saved workspace (the running buffers may have changed since).
A synchronized (SyncBatchNorm) BatchNorm is refused with an error: its statistics span
processes.
"""
import torch

from .plan import carve
from .reference import cbam_reference
from .spec import CBAMSpec, CBAMWeights


def differentiable_backward(g, x, saved_acc, plan, spec: CBAMSpec, w: CBAMWeights,
                            bn_batch_stats: bool, group, need_dx: bool, need_fields):
    """(dx or None, {field: gradient}) as differentiable functions of g, x and the weights.

    need_fields: the CBAMWeights field names whose gradient is wanted."""
    if group is not None:
        raise NotImplementedError(
            "cbam_fused: a differentiable backward (create_graph=True) through a "
            "synchronized (SyncBatchNorm) spatial BatchNorm is not supported; use "
            "cbam_fused.unconvert(model) for second-order gradients")
    if w.has_bn and spec.has_spatial:
        if bn_batch_stats:
            w = w._replace(bn_running_mean=None, bn_running_var=None)
        else:
            mean, invstd, _ = carve(saved_acc, plan.saved_acc_layout())["bn_stats"].unbind()
            var = invstd.reciprocal().square() - spec.bn_eps  # the forward's running_var
            w = w._replace(bn_running_mean=mean.reshape(1), bn_running_var=var.reshape(1))
    names = [n for n in need_fields if getattr(w, n) is not None]
    inputs = ([x] if need_dx else []) + [getattr(w, n) for n in names]
    if not inputs:
        return None, {}
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        out = cbam_reference(x, spec, w, bn_training=bn_batch_stats, bn_momentum=0.0)
        grads = torch.autograd.grad(out, inputs, g, create_graph=True, allow_unused=True)
    grads = list(grads)
    dx = grads.pop(0) if need_dx else None
    return dx, dict(zip(names, grads))
