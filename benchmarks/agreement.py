"""Agreement of the fused block with the float64 reference: forward, dx, parameter grads.

Used by the main job (run.py); the tests hold the pass/fail bounds, this only reports.
"""
import copy

import torch

from cbam_fused import CBAM, cbam_reference

# The CBAM variants of docs/design.md section 2, as cbam_fused.CBAM options.
VARIANTS = {
    "official": dict(),
    "timm": dict(spatial_pool="mean,max", mlp_bias=False, bn_momentum=0.1, max_mode="amax"),
    "timm-light": dict(channel_pool="mean(avg,max)", spatial_pool="mean(mean,max)",
                       mlp_bias=False, bn_momentum=0.1, max_mode="amax"),
    "ultralytics": dict(channel_pool="avg", channel_mlp=False, spatial_pool="mean,max",
                        spatial_bn=False),
}


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def agreement(variant, shape, dtype, layout, device):
    """Max relative error (vs max |reference|) of out, dx and the worst parameter grad."""
    N, C, H, W = shape
    m = CBAM(C, **VARIANTS[variant]).to(device).train()
    ref = copy.deepcopy(m).double().cpu()
    bn = m.spatial_bn()
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    xr = x.detach().double().cpu().requires_grad_()
    out_r = cbam_reference(xr, ref.spec, ref.fused_weights(), bn_training=bn is not None,
                           bn_momentum=bn.momentum if bn is not None else 0.0)
    out_r.backward(g.double().cpu())
    param_err = max(_rel(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters()))
    return dict(variant=variant, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                layout=layout, out=_rel(out, out_r), dx=_rel(x.grad, xr.grad), params=param_err)


def agreement_rows(device, shape):
    rows = []
    for variant in VARIANTS:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                rows.append(agreement(variant, shape, dtype, layout, device))
    return rows
