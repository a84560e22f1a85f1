"""The small maps phi (pooled channel stats -> channel logits) and psi (pooled
spatial maps -> spatial logits), in plain PyTorch.

They work on N x C and N x H x W tensors, thousands of times smaller than x. The
fused forward calls them under no_grad; the fused backward calls them again under
enable_grad and differentiates them with torch.autograd.grad, so every variant
gets exact gradients for its own parameters without hand-written MLP, conv or
BatchNorm backward code. Weights are cast to the statistics' dtype (fp32, or fp64
for fp64 inputs); autograd casts their gradients back.
"""
import torch
import torch.nn.functional as F

from .spec import CBAMSpec, CBAMWeights


def _linear(v, weight, bias):
    w = weight.reshape(weight.shape[0], -1).to(v.dtype)
    return F.linear(v, w, None if bias is None else bias.to(v.dtype))


def channel_logits(spec: CBAMSpec, avg, mx, w: CBAMWeights):
    """phi: [N, C] avg and max pools -> [N, C] logits (before the sigmoid)."""
    if spec.channel_pool == "avg+max":
        v = torch.cat([avg, mx], 0)  # both pools through the MLP in one batch
    elif spec.channel_pool == "mean(avg,max)":
        v = 0.5 * avg + 0.5 * mx
    else:
        v = avg
    h = _linear(v, w.fc1_weight, w.fc1_bias)
    if w.fc2_weight is not None:
        h = _linear(torch.relu(h), w.fc2_weight, w.fc2_bias)
    if spec.channel_pool == "avg+max":
        n = avg.shape[0]
        h = h[:n] + h[n:]
    return h


def spatial_logits(spec: CBAMSpec, smean, smax, w: CBAMWeights, *, bn_training: bool,
                   bn_momentum: float, update_running_stats: bool):
    """psi: [N, 1, H, W] channel-mean and channel-max maps -> [N, 1, H, W] logits.

    With BatchNorm in training mode the batch statistics of the conv output are
    used; running statistics are updated only when update_running_stats is set
    (the forward), not when the backward recomputes this graph.
    """
    if spec.spatial_pool == "max,mean":
        z = torch.cat([smax, smean], 1)
    elif spec.spatial_pool == "mean,max":
        z = torch.cat([smean, smax], 1)
    else:
        z = 0.5 * smean + 0.5 * smax
    dt = z.dtype
    u = F.conv2d(z, w.conv_weight.to(dt), None if w.conv_bias is None else w.conv_bias.to(dt),
                 padding=spec.kernel_size // 2)
    if not w.has_bn:
        return u
    bw = None if w.bn_weight is None else w.bn_weight.to(dt)
    bb = None if w.bn_bias is None else w.bn_bias.to(dt)
    rm, rv = w.bn_running_mean, w.bn_running_var
    if bn_training and not update_running_stats:
        rm = rv = None
    if rm is None:
        return F.batch_norm(u, None, None, bw, bb, bn_training, bn_momentum, spec.bn_eps)
    # Statistics in the buffers' own dtype may differ from the compute dtype: update a
    # cast copy, then write it back.
    rm_c, rv_c = rm.to(dt), rv.to(dt)
    out = F.batch_norm(u, rm_c, rv_c, bw, bb, bn_training, bn_momentum, spec.bn_eps)
    if bn_training and rm_c is not rm:
        rm.copy_(rm_c)
        rv.copy_(rv_c)
    return out
