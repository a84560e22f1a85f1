"""The fused block's forward and backward as PyTorch operators, namespace `cbam_fused`.

Registered with torch.library.define/impl plus a fake (meta) implementation each, so
torch.compile (fullgraph) and torch.export see each direction as one opaque op with
known output shapes, strides and dtypes. Autograd lives one level up, in the
block-level autograd.Function (function.py).

Eager calls skip the dispatcher and call the Python implementation directly
(`function.passes()`): the registered op costs microseconds of host time per call that buy
nothing outside a compiler. Both routes run the same code.

Ops (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):
  block_forward(x, <weights>, <buffers, mutated>, p_contig, <variant>, bn_batch_stats, momentum)
      -> (out, saved_acc, saved_i32)
  block_backward(g, x, saved_acc, saved_i32, <weights>, p_contig, <variant>, bn_batch_stats,
                 need_dx) -> [dx (empty when not needed), gradient of each weight present]
The variant is (channel_pool, spatial_pool, kernel_size, max_mode, bn_eps, has_bn).
"""
import os
import types

import torch

from .launchers import as_layout
from .plan import layout_size, saved_layouts
from .spec import CBAMSpec, CBAMWeights

NAMESPACE = "cbam_fused"

_WEIGHTS = ("Tensor fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, Tensor? fc2_bias, "
            "Tensor? conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias")
_VARIANT = "str channel_pool, str? spatial_pool, int kernel_size, str max_mode, float bn_eps, bool has_bn"
_SCHEMAS = {
    "block_forward": (f"(Tensor x, {_WEIGHTS}, Tensor(a!)? bn_running_mean, "
                      f"Tensor(b!)? bn_running_var, Tensor(c!)? bn_num_batches_tracked, "
                      f"bool p_contig, {_VARIANT}, bool bn_batch_stats, float momentum) "
                      f"-> (Tensor, Tensor, Tensor)"),
    "block_backward": (f"(Tensor g, Tensor x, Tensor saved_acc, Tensor saved_i32, {_WEIGHTS}, "
                       f"Tensor? bn_running_mean, Tensor? bn_running_var, bool p_contig, "
                       f"{_VARIANT}, bool bn_batch_stats, bool need_dx) -> Tensor[]"),
}
_GRAD_FIELDS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight", "conv_bias",
                "bn_weight", "bn_bias")


def _spec(channel_pool, spatial_pool, kernel_size, max_mode, bn_eps):
    return CBAMSpec(channel_pool, spatial_pool, kernel_size, max_mode, bn_eps)


def _variant(spec: CBAMSpec, has_bn: bool):
    return (spec.channel_pool, spec.spatial_pool, spec.kernel_size, spec.max_mode, spec.bn_eps,
            has_bn)


# ---------------------------------------------------------------- real implementations

def _block_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                   bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                   p_contig, channel_pool, spatial_pool, kernel_size, max_mode, bn_eps, has_bn,
                   bn_batch_stats, momentum):
    from .function import fused_forward
    w = CBAMWeights(fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                    bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                    has_bn)
    spec = _spec(channel_pool, spatial_pool, kernel_size, max_mode, bn_eps)
    return fused_forward(x, p_contig, spec, w, bn_batch_stats, momentum)


def _block_backward(g, x, saved_acc, saved_i32, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                    conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                    p_contig, channel_pool, spatial_pool, kernel_size, max_mode, bn_eps, has_bn,
                    bn_batch_stats, need_dx):
    from .function import fused_backward
    w = CBAMWeights(fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                    bn_weight, bn_bias, bn_running_mean, bn_running_var, None, has_bn)
    spec = _spec(channel_pool, spatial_pool, kernel_size, max_mode, bn_eps)
    dx, grads = fused_backward(g, x, p_contig, saved_acc, saved_i32, spec, w, bn_batch_stats,
                               need_dx)
    return [dx if dx is not None else g.new_empty(0)] + [grads[n] for n in _GRAD_FIELDS
                                                         if n in grads]


# ---------------------------------------------------------------- fake implementations

def _fake_forward(x, fc1_weight, fc1_bias, fc2_weight, *rest):
    (fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias, rm, rv, nbt, p_contig, channel_pool,
     spatial_pool, kernel_size, max_mode, bn_eps, has_bn, bn_batch_stats, momentum) = rest
    N, C, H, W = x.shape
    hidden = fc1_weight.shape[0] if fc2_weight is not None else C
    acc_layout, i32_layout = saved_layouts(N, C, H * W, hidden, fc2_weight is not None,
                                           spatial_pool is not None)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.empty_like(x), x.new_empty(layout_size(acc_layout), dtype=acc),
            x.new_empty(layout_size(i32_layout), dtype=torch.int32))


def _fake_backward(g, x, saved_acc, saved_i32, *rest):
    weights = rest[:8]
    p_contig, need_dx = rest[10], rest[-1]
    # dx has the layout the kernels write: g brought to x's layout (launchers.as_layout)
    out = [torch.empty_like(as_layout(g, p_contig)) if need_dx else g.new_empty(0)]
    return out + [torch.empty_like(t, memory_format=torch.contiguous_format)
                  for t in weights if t is not None]


def _cpu(impl, name):
    def cpu(*args):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(f"{NAMESPACE}::{name} on CPU tensors needs the Triton "
                               f"interpreter (TRITON_INTERPRET=1); use CUDA tensors otherwise")
        return impl(*args)
    return cpu


_IMPLS = dict(block_forward=_block_forward, block_backward=_block_backward)
_FAKES = dict(block_forward=_fake_forward, block_backward=_fake_backward)

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _IMPLS[_name], "CUDA")
    _lib.impl(_name, _cpu(_IMPLS[_name], _name), "CPU")
    # not differentiable by itself: the block's autograd.Function (function.py) owns autograd
    _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name], lib=_lib)

OPS_RAW = types.SimpleNamespace(**{n: getattr(getattr(torch.ops, NAMESPACE), n) for n in _SCHEMAS})


def _weights_args(w: CBAMWeights):
    return (w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, w.conv_weight, w.conv_bias,
            w.bn_weight, w.bn_bias)


class _Registered:
    """block_forward / block_backward through the registered ops (what torch.compile sees)."""

    @staticmethod
    def block_forward(xd, p_contig, spec, w, bn_batch_stats, momentum, group=None):
        if group is not None:
            raise NotImplementedError("cbam_fused: a synchronized (SyncBatchNorm) spatial "
                                      "BatchNorm is not supported inside torch.compile")
        return tuple(OPS_RAW.block_forward(
            xd, *_weights_args(w), w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked,
            p_contig, *_variant(spec, w.has_bn), bn_batch_stats, momentum))

    @staticmethod
    def block_backward(g, xd, p_contig, saved_acc, saved_i32, spec, w, bn_batch_stats, need_dx,
                       group=None):
        if group is not None:
            raise NotImplementedError("cbam_fused: a synchronized (SyncBatchNorm) spatial "
                                      "BatchNorm is not supported inside torch.compile")
        res = OPS_RAW.block_backward(g, xd, saved_acc, saved_i32, *_weights_args(w),
                                     w.bn_running_mean, w.bn_running_var, p_contig,
                                     *_variant(spec, w.has_bn), bn_batch_stats, need_dx)
        present = [n for n in _GRAD_FIELDS if getattr(w, n) is not None]
        return (res[0] if need_dx else None), dict(zip(present, res[1:]))


OPS = _Registered
