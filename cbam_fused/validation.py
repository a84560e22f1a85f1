"""Input checks, run before any kernel launch and before any module state changes.

Each error names the problem: what was expected and what was given.
"""
import functools

import torch

from .plan import MAX_HIDDEN
from .spec import NUM_TENSOR_FIELDS, CBAMSpec, CBAMWeights

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = CBAMWeights._fields[:NUM_TENSOR_FIELDS]
_BN_FIELDS = ("bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")


def _shape(t):
    return tuple(t.shape)


def check_inputs(x, spec: CBAMSpec, w: CBAMWeights, bn_training: bool, channels=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"CBAM expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"CBAM expects a 4-D input (N, C, H, W), got a {x.dim()}-D tensor "
                         f"of shape {_shape(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"CBAM supports float16, bfloat16, float32 and float64 inputs, "
                        f"got {x.dtype}")
    device = x.device
    if not (x.is_cuda or x.is_cpu):  # (not device.type: it builds a string, ~1 us a call)
        raise ValueError(f"CBAM runs on CUDA or CPU tensors, got device {device}")
    N, C, H, W = x.shape
    if channels is not None and C != channels:
        raise ValueError(f"CBAM built for {channels} channels got an input with {C} channels "
                         f"(shape {_shape(x)})")
    meta = tuple([None if t is None else (t.shape, t.dtype, t.device)
                  for t in w[:NUM_TENSOR_FIELDS]])
    if torch.compiler.is_compiling():  # sizes may be symbolic (unhashable): no cache
        _check_weights(C, spec, device, meta, compiling=True)
    else:
        _check_weights_cached(C, spec, device, meta)
    if bn_training and w.has_bn and N * H * W <= 1 and N > 0:
        raise ValueError(f"CBAM spatial BatchNorm in training mode needs more than one value "
                         f"per channel, got input of shape {_shape(x)} (N*H*W = {N * H * W}); "
                         f"use eval mode or a larger batch")


def _has_shape(have, shape, compiling: bool) -> bool:
    """have == shape. Under torch.compile, size by size: with dynamic shapes the
    expected sizes can be symbolic, which tuple comparison does not trace."""
    if not compiling:
        return have == shape
    if len(have) != len(shape):
        return False
    for a, b in zip(have, shape):
        if a != b:
            return False
    return True


def _expect(name, meta, *shapes, compiling=False):
    if meta is None:
        return
    for shape in shapes:
        if _has_shape(meta[0], shape, compiling):
            return
    want = " or ".join(str(s) for s in shapes)
    raise ValueError(f"CBAM parameter {name} has shape {tuple(meta[0])}, expected {want}")


def _check_weights(C: int, spec: CBAMSpec, device, meta, compiling: bool = False):
    """The weight checks, on each weight's (shape, dtype, device) or None (`meta`): a
    function of the metadata alone, so an eager call reuses the verdict of an earlier
    call with the same metadata (_check_weights_cached)."""
    for name, m in zip(_FIELDS, meta):
        if m is None:
            continue
        if m[2] != device:
            raise ValueError(f"CBAM parameter {name} is on {m[2]} but the input is on "
                             f"{device}; move the module to the input's device")
        if not m[1].is_floating_point and name != "bn_num_batches_tracked":
            raise TypeError(f"CBAM parameter {name} must be floating point, got {m[1]}")
    fc1, fc1_bias, fc2, fc2_bias, conv, conv_bias, *bn = meta[:10]
    if fc1 is None:
        raise ValueError("CBAM needs the channel map's first weight (fc1_weight)")
    lead = fc1[0][0] if len(fc1[0]) > 0 else -1
    if fc2 is None:  # one layer C -> C
        _expect("fc1_weight", fc1, (C, C), (C, C, 1, 1), compiling=compiling)
    else:
        if lead > MAX_HIDDEN:
            raise ValueError(f"CBAM channel MLP with {lead} hidden units: the fused block "
                             f"supports at most {MAX_HIDDEN}")
        _expect("fc1_weight", fc1, (lead, C), (lead, C, 1, 1), compiling=compiling)
        _expect("fc2_weight", fc2, (C, lead), (C, lead, 1, 1), compiling=compiling)
        _expect("fc2_bias", fc2_bias, (C,), compiling=compiling)
    _expect("fc1_bias", fc1_bias, (lead,), compiling=compiling)
    if not spec.has_spatial:
        return
    k = spec.kernel_size
    if conv is None:
        raise ValueError("CBAM with a spatial gate needs the spatial conv weight (conv_weight)")
    _expect("conv_weight", conv, (1, spec.spatial_maps, k, k), compiling=compiling)
    _expect("conv_bias", conv_bias, (1,), compiling=compiling)
    for name, m in zip(_BN_FIELDS, bn):
        _expect(name, m, (1,), compiling=compiling)


# Passing verdicts only (a raise is not cached); keyed by plain values: C, the spec, the
# device and torch.Size/dtype/device triples.
_check_weights_cached = functools.lru_cache(maxsize=256)(_check_weights)
