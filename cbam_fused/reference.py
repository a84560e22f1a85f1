"""Plain PyTorch CBAM, written from the formulas (docs/design.md section 1 and 2).

This is the oracle every test compares against (tests call it on float64 copies),
and the path CPU tensors take when the Triton interpreter is off. It shares no
code with the fused path beyond the CBAMSpec/CBAMWeights description: it pools
the full 4-D tensor with torch.mean / torch.max / torch.amax, materializes
y = x * ca, and lets autograd differentiate everything.
"""
import torch
import torch.nn.functional as F

from .spec import CBAMSpec, CBAMWeights


def _pool_max(t, dims, amax: bool):
    """Max over dims (keepdim); amax splits the gradient among ties, torch.max gives it
    to the first maximum in row-major order."""
    if amax:
        return t.amax(dims, keepdim=True)
    if dims == (1,):
        return t.max(1, keepdim=True).values
    return t.flatten(2).max(2, keepdim=True).values.unsqueeze(-1)  # dims (2, 3)


def _dense(v, weight, bias):
    """A Linear- or 1x1-conv-shaped layer applied to [N, C, 1, 1]."""
    return F.conv2d(v, weight.reshape(weight.shape[0], -1, 1, 1).to(v.dtype),
                    None if bias is None else bias.to(v.dtype))


def _mlp(v, w: CBAMWeights):
    h = _dense(v, w.fc1_weight, w.fc1_bias)
    if w.fc2_weight is None:
        return h
    return _dense(F.relu(h), w.fc2_weight, w.fc2_bias)


def cbam_reference(x, spec: CBAMSpec, w: CBAMWeights, *, bn_training: bool = False,
                   bn_momentum: float = 0.1, gates=None):
    """out = x * ca * sa; computed in fp32 (fp64 for fp64 input), returned in x.dtype.

    Updates w.bn_running_mean / w.bn_running_var in place when bn_training. `gates`, if
    given, is called as gates(ca, sa or None, x.shape) (attention.py records them).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(dt)
    avg = xc.mean((2, 3), keepdim=True)
    mx = _pool_max(xc, (2, 3), spec.amax)
    if spec.channel_pool == "avg+max":
        z = _mlp(avg, w) + _mlp(mx, w)
    elif spec.channel_pool == "mean(avg,max)":
        z = _mlp(0.5 * avg + 0.5 * mx, w)
    else:
        z = _mlp(avg, w)
    ca = torch.sigmoid(z)
    y = xc * ca
    if not spec.has_spatial:
        if gates is not None:
            gates(ca, None, x.shape)
        return y.to(x.dtype)

    smean = y.mean(1, keepdim=True)
    smax = _pool_max(y, (1,), spec.amax)
    maps = {"max,mean": [smax, smean], "mean,max": [smean, smax],
            "mean(mean,max)": [0.5 * smean + 0.5 * smax]}[spec.spatial_pool]
    u = F.conv2d(torch.cat(maps, 1), w.conv_weight.to(dt),
                 None if w.conv_bias is None else w.conv_bias.to(dt),
                 padding=spec.kernel_size // 2)
    if w.has_bn:
        rm, rv = w.bn_running_mean, w.bn_running_var
        rm_c = None if rm is None else rm.to(dt)
        rv_c = None if rv is None else rv.to(dt)
        u = F.batch_norm(u, rm_c, rv_c,
                         None if w.bn_weight is None else w.bn_weight.to(dt),
                         None if w.bn_bias is None else w.bn_bias.to(dt),
                         bn_training, bn_momentum, spec.bn_eps)
        if bn_training and rm is not None and rm_c is not rm:
            with torch.no_grad():
                rm.copy_(rm_c)
                rv.copy_(rv_c)
    sa = torch.sigmoid(u)
    if gates is not None:
        gates(ca, sa, x.shape)
    return (y * sa).to(x.dtype)
