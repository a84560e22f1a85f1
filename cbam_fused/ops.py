"""The six big-tensor passes as PyTorch operators, namespace `cbam_fused`.

Registered with torch.library.define/impl plus a fake (meta) implementation each, so
torch.compile (fullgraph) and torch.export see them as opaque ops with known output
shapes, strides and dtypes, while the small maps between them stay ordinary aten ops
that the compiler can fuse. Autograd lives one level up, in the block-level
autograd.Function (function.py): the backward of the block is not the sum of the
passes' own backwards (that would cost about 12|x| of traffic instead of 5|x|).

Eager calls skip the dispatcher and call the launchers directly (`passes()`): the
registered op costs a few microseconds of host time per call that buys nothing
outside a compiler. Both routes run the same launcher code.

Ops (all on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):
  channel_stats(x, p_contig)                     F1  -> sum, max, argmax, count [N, C]
  spatial_stats(x, ca, p_contig)                 F2  -> sum, max, argmax, count [N, H*W]
  gate_apply(x, ca, sa?, p_contig)               F3  -> out, x's shape and layout
  bwd_gate_sums(g, x, ca, sa?, p_contig)         B1  -> Gs [N, H*W] ([N, 0] without sa), Gc1 [N, C]
  bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig, amax)   B2 -> Gc2 [N, C]
  bwd_input(g, x, ca, sa?, dsmean?, dsmax?, smax?, sidx?, scnt?, davg, dmx, mx, cidx, ccnt,
            p_contig, amax)                      B3  -> dx, g's shape and layout
"""
import os
import types

import torch

from . import launchers as L

NAMESPACE = "cbam_fused"

_SCHEMAS = {
    "channel_stats": "(Tensor x, bool p_contig) -> (Tensor, Tensor, Tensor, Tensor)",
    "spatial_stats": "(Tensor x, Tensor ca, bool p_contig) -> (Tensor, Tensor, Tensor, Tensor)",
    "gate_apply": "(Tensor x, Tensor ca, Tensor? sa, bool p_contig) -> Tensor",
    "bwd_gate_sums": "(Tensor g, Tensor x, Tensor ca, Tensor? sa, bool p_contig) -> (Tensor, Tensor)",
    "bwd_spatial_pool": ("(Tensor x, Tensor ca, Tensor dsmean, Tensor dsmax, Tensor smax, "
                         "Tensor sidx, Tensor scnt, bool p_contig, bool amax) -> Tensor"),
    "bwd_input": ("(Tensor g, Tensor x, Tensor ca, Tensor? sa, Tensor? dsmean, Tensor? dsmax, "
                  "Tensor? smax, Tensor? sidx, Tensor? scnt, Tensor davg, Tensor dmx, Tensor mx, "
                  "Tensor cidx, Tensor ccnt, bool p_contig, bool amax) -> Tensor"),
}


# ---------------------------------------------------------------- real implementations

def _channel_stats(x, p_contig):
    return L.channel_stats(x, p_contig)


def _spatial_stats(x, ca, p_contig):
    return L.spatial_stats(x, ca, p_contig)


def _gate_apply(x, ca, sa, p_contig):
    return L.gate_apply(x, ca, sa, p_contig)


def _bwd_gate_sums(g, x, ca, sa, p_contig):
    gs, gc = L.bwd_gate_sums(g, x, ca, sa, p_contig)
    if gs is None:
        gs = gc.new_empty(x.shape[0], 0)
    return gs, gc


def _bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig, amax):
    return L.bwd_spatial_pool(x, ca, dsmean, dsmax, smax, sidx, scnt, p_contig, amax)


def _bwd_input(g, x, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx, ccnt,
               p_contig, amax):
    return L.bwd_input(g, x, ca, sa, dsmean, dsmax, smax, sidx, scnt, davg, dmx, mx, cidx,
                       ccnt, p_contig, amax)


_IMPLS = dict(channel_stats=_channel_stats, spatial_stats=_spatial_stats, gate_apply=_gate_apply,
              bwd_gate_sums=_bwd_gate_sums, bwd_spatial_pool=_bwd_spatial_pool,
              bwd_input=_bwd_input)


# ---------------------------------------------------------------- fake implementations

def _stats_like(x, R):
    N = x.shape[0]
    acc = L.acc_dtype(x.dtype)
    return (x.new_empty(N, R, dtype=acc), x.new_empty(N, R, dtype=acc),
            x.new_empty(N, R, dtype=torch.int32), x.new_empty(N, R, dtype=torch.int32))


_FAKES = dict(
    channel_stats=lambda x, p_contig: _stats_like(x, x.shape[1]),
    spatial_stats=lambda x, ca, p_contig: _stats_like(x, x.shape[2] * x.shape[3]),
    gate_apply=lambda x, ca, sa, p_contig: torch.empty_like(x),
    bwd_gate_sums=lambda g, x, ca, sa, p_contig: (
        x.new_empty(x.shape[0], x.shape[2] * x.shape[3] if sa is not None else 0,
                    dtype=L.acc_dtype(x.dtype)),
        x.new_empty(x.shape[0], x.shape[1], dtype=L.acc_dtype(x.dtype))),
    bwd_spatial_pool=lambda x, *rest: x.new_empty(x.shape[0], x.shape[1], dtype=L.acc_dtype(x.dtype)),
    bwd_input=lambda g, *rest: torch.empty_like(g),
)


def _device_impl(name):
    impl = _IMPLS[name]

    def cpu(*args):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(f"{NAMESPACE}::{name} on CPU tensors needs the Triton "
                               f"interpreter (TRITON_INTERPRET=1); use CUDA tensors otherwise")
        return impl(*args)
    return cpu


_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _IMPLS[_name], "CUDA")
    _lib.impl(_name, _device_impl(_name), "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name], lib=_lib)

OPS = types.SimpleNamespace(**{n: getattr(getattr(torch.ops, NAMESPACE), n) for n in _SCHEMAS})
DIRECT = types.SimpleNamespace(**_IMPLS)


def passes():
    """The registered ops while torch.compile traces, the launchers directly otherwise."""
    return OPS if torch.compiler.is_compiling() else DIRECT
