"""Shared test helpers: the variants under test, float64 reference runs, tolerances."""
import contextlib
import copy
import math

import torch

from cbam_fused import CBAM, cbam_reference
from cuda_preconditions import CudaArgumentChecks

# Module options for each CBAM variant of docs/design.md section 2, built with cbam_fused.CBAM.
VARIANTS = {
    "official": dict(),
    "timm": dict(channel_pool="avg+max", spatial_pool="mean,max", mlp_bias=False,
                 bn_momentum=0.1, max_mode="amax"),
    "timm_light": dict(channel_pool="mean(avg,max)", spatial_pool="mean(mean,max)",
                       mlp_bias=False, bn_momentum=0.1, max_mode="amax"),
    "ultralytics": dict(channel_pool="avg", channel_mlp=False, spatial_pool="mean,max",
                        spatial_bn=False),
    "no_spatial": dict(spatial_pool=None),
    "conv_bias_no_bn": dict(spatial_pool="mean,max", conv_bias=True, spatial_bn=False),
}

# Unit roundoff of each dtype: the rounding error of one stored value.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
                 torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def tolerance(io_dtype: torch.dtype, reduction_length: int) -> float:
    """Relative tolerance: a few roundings of the stored dtype, plus fp32 (fp64)
    accumulation error growing like sqrt(reduction length)."""
    acc = UNIT_ROUNDOFF[torch.float64 if io_dtype == torch.float64 else torch.float32]
    return 4 * UNIT_ROUNDOFF[io_dtype] + 32 * acc * math.sqrt(max(reduction_length, 1))


def assert_close(actual, expected, io_dtype, reduction_length, what="", conditioning=None):
    """|actual - expected| <= tol * (|expected| + max|expected|) + 4 * max|conditioning - expected|.

    The max|expected| term makes the check relative to the tensor's scale, so
    entries that cancel to near zero are not held to a relative bound.
    `conditioning` is the same reference evaluated in fp32 arithmetic (never the
    code under test), or a list of such evaluations: where the problem itself is
    ill-conditioned (BatchNorm over three values, say), fp32 rounding is amplified for
    any implementation, and the bound widens by as much as it measurably does for plain
    PyTorch (max|conditioning - expected| is the largest over the list).
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    tol = tolerance(io_dtype, reduction_length)
    bound = tol * (e.abs() + e.abs().max())
    if conditioning is not None:
        runs = conditioning if isinstance(conditioning, (list, tuple)) else [conditioning]
        bound = bound + 4 * max((c.detach().to(torch.float64).cpu() - e).abs().max() for c in runs)
    err = (a - e).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.numel()} entries off; worst rel err "
            f"{float((err / (e.abs().max() + 1e-300)).max()):.3e} vs tol {tol:.3e}; "
            f"first at flat index {i}: got {float(a.flatten()[i])}, want {float(e.flatten()[i])}")


def make_module(variant, channels, device, *, reduction=4, kernel_size=7, train=True):
    m = CBAM(channels, reduction=reduction, kernel_size=kernel_size, **VARIANTS[variant])
    with torch.no_grad():  # non-trivial BatchNorm affine and running stats
        for name, p in m.named_parameters():
            if "bn" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if "running_mean" in name:
                b.add_(0.2)
            if "running_var" in name:
                b.mul_(1.5)
    return m.to(device).train(train)


def bn_args(module):
    """(bn_training, momentum) the way nn.BatchNorm2d resolves them, for the reference."""
    if not module.spec.has_spatial or module.SpatialGate.spatial.bn is None:
        return False, 0.0
    bn = module.SpatialGate.spatial.bn
    return bn.training, bn.momentum


def cuda_argument_checks(device):
    """On CPU, raise where a CUDA kernel would reject the arguments (cuda_preconditions.py);
    on CUDA the real kernels check."""
    return CudaArgumentChecks() if torch.device(device).type == "cpu" else contextlib.nullcontext()


def run_pair(module, x, grad_out=None):
    """Fused forward+backward on (module, x), the float64 reference on copies, and the
    reference in fp32 arithmetic ('ref32', for the conditioning term of assert_close).

    Returns dict with 'fused', 'ref' and 'ref32': out, x grad, parameter grads (by
    name), buffers (by name) after the forward. 'ref32s' holds the fp32 reference on x
    and on x scaled by 1 +- one fp32 unit roundoff: how far plain PyTorch in fp32 moves
    under the rounding of its input, which any implementation's intermediate roundings
    resemble; one algorithm's lucky cancellation on x alone does not set the bound.
    """
    ref_module = copy.deepcopy(module).double().cpu()
    bn_training, momentum = bn_args(module)

    xf = x.detach().clone().requires_grad_()
    with cuda_argument_checks(x.device):
        out = module(xf)
    g = torch.randn_like(out) if grad_out is None else grad_out
    with cuda_argument_checks(x.device):
        out.backward(g)

    xr = x.detach().cpu().double().requires_grad_()
    out_r = cbam_reference(xr, ref_module.spec, ref_module.fused_weights(),
                           bn_training=bn_training, bn_momentum=momentum)
    out_r.backward(g.detach().cpu().double())

    def pack(m, o, xx):
        return dict(out=o, dx=xx.grad,
                    grads={n: p.grad for n, p in m.named_parameters()},
                    buffers={n: b for n, b in m.named_buffers() if "num_batches" not in n})

    ref32s = []
    u32 = UNIT_ROUNDOFF[torch.float32] if x.dtype != torch.float64 else UNIT_ROUNDOFF[torch.float64]
    for scale in (0.0, 1.0, -1.0):
        ref32_module = copy.deepcopy(module).cpu()
        if x.dtype != torch.float64:
            ref32_module = ref32_module.float()
        x32 = x.detach().cpu()
        if scale:
            x32 = (x32.double() * (1 + scale * u32)).to(torch.float64 if x.dtype == torch.float64
                                                        else torch.float32)
        x32 = x32.requires_grad_()
        out_32 = cbam_reference(x32, ref32_module.spec, ref32_module.fused_weights(),
                                bn_training=bn_training, bn_momentum=momentum)
        out_32.backward(g.detach().cpu().to(out_32.dtype))
        ref32s.append(pack(ref32_module, out_32, x32))
    return dict(fused=pack(module, out, xf), ref=pack(ref_module, out_r, xr),
                ref32=ref32s[0], ref32s=ref32s)


def check_pair(res, io_dtype, x_shape, what=""):
    """Compare every output of run_pair with the reduction lengths each one involves."""
    N, C, H, W = x_shape
    f, r, r32s = res["fused"], res["ref"], res["ref32s"]

    def cond(key, name=None):
        return [c[key] if name is None else c[key][name] for c in r32s]
    L_fwd = max(C, H * W) * 4
    assert_close(f["out"], r["out"], io_dtype, L_fwd, f"{what} out", cond("out"))
    assert_close(f["dx"], r["dx"], io_dtype, L_fwd * 4, f"{what} dx", cond("dx"))
    for n in r["grads"]:
        if r["grads"][n] is None:  # a frozen parameter
            assert f["grads"][n] is None, f"{what} a gradient for frozen {n}"
            continue
        assert f["grads"][n] is not None, f"{what} no grad for {n}"
        # parameter grads: reductions over N*C*H*W; stored in the parameter dtype (fp32/fp64)
        assert_close(f["grads"][n], r["grads"][n], io_dtype, N * C * H * W * 4,
                     f"{what} grad {n}", cond("grads", n))
    for n in r["buffers"]:
        assert_close(f["buffers"][n], r["buffers"][n], io_dtype, N * H * W,
                     f"{what} buffer {n}", cond("buffers", n))
