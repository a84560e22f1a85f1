"""The small maps phi (pooled channel stats -> channel logits) and psi (pooled
spatial maps -> spatial logits), forward and hand-written backward, in plain PyTorch.

They work on N x C and N x H x W tensors, thousands of times smaller than x. The
backward is written out (no torch.autograd.grad inside the fused backward) so that
torch.compile can trace the whole block, forward and backward, into one graph.
Weights are cast to the statistics' dtype (fp32, or fp64 for fp64 inputs) and their
gradients are cast back to each weight's own dtype and shape.

Each *_forward returns (logits, saved), where `saved` holds the small intermediates
its *_backward needs beyond the pooled statistics; each *_backward returns the
pooled-statistic gradients and a dict {CBAMWeights field: gradient} for the weights
in `want`.
"""
import torch
import torch.nn.functional as F

from .spec import CBAMSpec, CBAMWeights
from .sync_bn import sync_bn_backward, sync_bn_forward


def _matrix(weight, dt):
    """A Linear [out, in] or 1x1-conv [out, in, 1, 1] weight as an [out, in] matrix."""
    return weight.reshape(weight.shape[0], -1).to(dt)


def _cast(t, dt):
    return None if t is None else t.to(dt)


def _store(grads, want, name, grad, like):
    if name in want and like is not None:
        grads[name] = grad.to(like.dtype).reshape(like.shape)


# ------------------------------------------------------------------ phi

def _mlp_input(spec: CBAMSpec, avg, mx):
    if spec.channel_pool == "avg+max":
        return torch.cat([avg, mx], 0)  # both pools through the MLP as one batch
    if spec.channel_pool == "mean(avg,max)":
        return 0.5 * avg + 0.5 * mx
    return avg


def channel_forward(spec: CBAMSpec, avg, mx, w: CBAMWeights):
    """phi: [N, C] avg and max pools -> ([N, C] logits before the sigmoid, saved).

    saved is the hidden pre-activation h ([N or 2N, hidden], small); the backward
    rebuilds the MLP input from the pools, which the fused backward keeps anyway."""
    v = _mlp_input(spec, avg, mx)
    dt = v.dtype
    h = F.linear(v, _matrix(w.fc1_weight, dt), _cast(w.fc1_bias, dt))
    o = h
    if w.fc2_weight is not None:
        o = F.linear(torch.relu(h), _matrix(w.fc2_weight, dt), _cast(w.fc2_bias, dt))
    if spec.channel_pool == "avg+max":
        n = avg.shape[0]
        o = o[:n] + o[n:]
    return o, h


def channel_backward(spec: CBAMSpec, dlogits, avg, mx, h, w: CBAMWeights, want):
    """d(phi): -> (davg, dmax, weight gradients)."""
    v = _mlp_input(spec, avg, mx)
    dt = v.dtype
    do = torch.cat([dlogits, dlogits], 0) if spec.channel_pool == "avg+max" else dlogits
    grads = {}
    if w.fc2_weight is not None:
        _store(grads, want, "fc2_weight", do.t() @ torch.relu(h), w.fc2_weight)
        _store(grads, want, "fc2_bias", do.sum(0), w.fc2_bias)
        # relu backward is aten's threshold_backward (a select, not a product), so NaN
        # and Inf reach exactly the units they reach in nn.ReLU's backward.
        dh = torch.ops.aten.threshold_backward(do @ _matrix(w.fc2_weight, dt), torch.relu(h), 0)
    else:
        dh = do
    _store(grads, want, "fc1_weight", dh.t() @ v, w.fc1_weight)
    _store(grads, want, "fc1_bias", dh.sum(0), w.fc1_bias)
    dv = dh @ _matrix(w.fc1_weight, dt)
    if spec.channel_pool == "avg+max":
        n = dlogits.shape[0]
        return dv[:n], dv[n:], grads
    if spec.channel_pool == "mean(avg,max)":
        half = 0.5 * dv
        return half, half, grads
    return dv, torch.zeros_like(dv), grads


# ------------------------------------------------------------------ psi

def spatial_forward(spec: CBAMSpec, smean, smax, w: CBAMWeights, *, bn_batch_stats: bool,
                    group=None):
    """psi: [N, 1, H, W] channel-mean and channel-max maps -> (logits, saved, batch).

    With BatchNorm and bn_batch_stats the conv output is normalized by its own batch
    statistics (over every process of `group` when one is given: SyncBatchNorm), and
    batch = (mean, unbiased var) for the running-statistic update; otherwise by the
    running statistics, and batch is None. Unsynchronized BatchNorm runs as aten's
    native_batch_norm, the kernel nn.BatchNorm2d uses, so the rounding of an
    ill-conditioned batch matches plain PyTorch; the backward uses aten's kernel for
    batch statistics and a written-out affine map in eval mode (_eval_bn_backward).
    """
    z, u = _conv(spec, smean, smax, w)
    dt = z.dtype
    if not w.has_bn:
        return u, (None, None, None), None
    gamma, beta = _cast(w.bn_weight, dt), _cast(w.bn_bias, dt)
    if bn_batch_stats and group is not None:
        s, uhat, invstd, mean, var, count = sync_bn_forward(u, gamma, beta, spec.bn_eps, group)
        return s, (uhat, invstd, count), (mean, var * (count / (count - 1).clamp(min=1)))
    if bn_batch_stats:
        s, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            u, gamma, beta, None, None, True, 0.0, spec.bn_eps)
        unbiased = torch.var(u, dim=(0, 2, 3), correction=1)  # for the running variance
        return s, (save_mean, save_invstd, None), (save_mean, unbiased)
    running = (w.bn_running_mean.to(dt), w.bn_running_var.to(dt))
    s, _, _ = torch.ops.aten.native_batch_norm(u, gamma, beta, *running, False, 0.0, spec.bn_eps)
    return s, (None, None, torch.stack(running)), None


def _conv(spec: CBAMSpec, smean, smax, w: CBAMWeights):
    """(conv input z, conv output u) of psi."""
    if spec.spatial_pool == "max,mean":
        z = torch.cat([smax, smean], 1)
    elif spec.spatial_pool == "mean,max":
        z = torch.cat([smean, smax], 1)
    else:
        z = 0.5 * smean + 0.5 * smax
    dt = z.dtype
    u = F.conv2d(z, w.conv_weight.to(dt), _cast(w.conv_bias, dt), padding=spec.kernel_size // 2)
    return z, u


def spatial_backward(spec: CBAMSpec, ds, smean, smax, saved, w: CBAMWeights, want, *,
                     bn_batch_stats: bool, group=None):
    """d(psi): [N, 1, H, W] logit gradient -> (dsmean, dsmax, weight gradients).

    The conv input and output are recomputed from the pooled maps (a small conv)
    rather than saved; saved holds BatchNorm's batch mean and 1/std, or the running
    statistics in eval mode."""
    z, u = _conv(spec, smean, smax, w)
    dt = z.dtype
    grads = {}
    du = ds
    if w.has_bn and bn_batch_stats and group is not None:
        uhat, invstd, count = saved
        du, dgamma, dbeta = sync_bn_backward(ds, uhat, invstd, _cast(w.bn_weight, dt), count, group)
        _store(grads, want, "bn_weight", dgamma, w.bn_weight)
        _store(grads, want, "bn_bias", dbeta, w.bn_bias)
    elif w.has_bn and bn_batch_stats:
        save_mean, save_invstd, _ = saved
        gamma = _cast(w.bn_weight, dt)
        du, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            ds, u, gamma, None, None, save_mean, save_invstd, True, spec.bn_eps,
            [True, gamma is not None and "bn_weight" in want,
             w.bn_bias is not None and "bn_bias" in want])
        if dgamma is not None:
            _store(grads, want, "bn_weight", dgamma, w.bn_weight)
        if dbeta is not None:
            _store(grads, want, "bn_bias", dbeta, w.bn_bias)
    elif w.has_bn:
        du = _eval_bn_backward(ds, u, saved[2], w, want, grads, spec.bn_eps)
    weight = w.conv_weight.to(dt)
    pad = spec.kernel_size // 2
    bias_sizes = [1] if w.conv_bias is not None else None
    dz, dweight, dbias = torch.ops.aten.convolution_backward(
        du, z, weight, bias_sizes, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
        [True, "conv_weight" in want, w.conv_bias is not None and "conv_bias" in want])
    if dweight is not None:
        _store(grads, want, "conv_weight", dweight, w.conv_weight)
    if dbias is not None:
        _store(grads, want, "conv_bias", dbias, w.conv_bias)
    if spec.spatial_pool == "max,mean":
        return dz[:, 1:2], dz[:, 0:1], grads
    if spec.spatial_pool == "mean,max":
        return dz[:, 0:1], dz[:, 1:2], grads
    half = 0.5 * dz
    return half, half, grads


def _eval_bn_backward(ds, u, running, w: CBAMWeights, want, grads, eps: float):
    """Backward of eval-mode BatchNorm, s = (u - rm) * invstd * gamma + beta with
    invstd = 1/sqrt(rv + eps) fixed: an affine map of u, so du = ds * gamma * invstd,
    dgamma = sum(ds * (u - rm) * invstd), dbeta = sum(ds).

    Written out rather than through aten's native_batch_norm_backward, whose CUDA
    kernel requires batch statistics (save_mean, save_invstd) even in eval mode."""
    rm, rv = running[0], running[1]
    invstd = torch.rsqrt(rv + eps)
    gamma = _cast(w.bn_weight, ds.dtype)
    scale = invstd if gamma is None else gamma * invstd
    dims = (0, 2, 3)
    if "bn_weight" in want:
        _store(grads, want, "bn_weight", (ds * ((u - rm) * invstd)).sum(dims), w.bn_weight)
    if "bn_bias" in want:
        _store(grads, want, "bn_bias", ds.sum(dims), w.bn_bias)
    return ds * scale


def update_running_stats(w: CBAMWeights, batch, momentum: float):
    """nn.BatchNorm2d's running-statistic update from batch = (mean, unbiased var), with
    factor momentum; computed in the statistics' dtype, written into the buffers in place."""
    if batch is None or w.bn_running_mean is None:
        return
    mean, var = batch
    with torch.no_grad():
        rm, rv = w.bn_running_mean, w.bn_running_var
        rm.copy_(rm.to(mean.dtype) * (1 - momentum) + mean * momentum)
        rv.copy_(rv.to(var.dtype) * (1 - momentum) + var * momentum)
