"""Drop-in conversion: replace the CBAM blocks of a model with fused equivalents.

Each fused wrapper adopts the source block's own child modules under the same
names, so it shares the very same parameter and buffer tensors and keeps the
state-dict keys: a checkpoint loads before or after conversion, an optimizer built
before conversion keeps working, and BatchNorm running statistics update in the
same buffers. `unconvert` puts the original blocks back.

Recognized by structure (no import of timm or ultralytics is needed):
- timm `CbamModule` / `LightCbamModule` (ReLU MLP, sigmoid gates, plain conv + BatchNorm),
- ultralytics `CBAM` (one 1x1 conv C->C, no spatial BatchNorm, kernel 3 or 7),
- the official implementation's `CBAM` (children ChannelGate and, unless no_spatial,
  SpatialGate), pool_types avg+max or avg.
Anything else that looks like CBAM is left alone and named in the report with the reason.
"""
import dataclasses
import logging
import warnings
from typing import List, Optional, Tuple

from torch import nn

from .modules import FusedCBAMBase, bn_fields, child, official_layout_weights, tensor
from .spec import CBAMSpec, CBAMWeights

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The block is CBAM-like, but a detail the fused path does not implement differs."""


@dataclasses.dataclass
class ConversionReport:
    replaced: List[Tuple[str, str]] = dataclasses.field(default_factory=list)   # (name, class)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, class, why)

    def __str__(self):
        lines = [f"cbam_fused.convert: replaced {len(self.replaced)} CBAM block(s)"]
        lines += [f"  replaced {n or '<root>'} ({c})" for n, c in self.replaced]
        lines += [f"  left alone {n or '<root>'} ({c}): {why}" for n, c, why in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------- structure checks

def _check_conv(conv, in_ch: int, out_ch: int, name: str) -> int:
    """A plain stride-1 'same' conv; returns its kernel size."""
    if type(conv) is not nn.Conv2d:
        raise Unsupported(f"{name} is {type(conv).__name__}, not a plain nn.Conv2d")
    k = conv.kernel_size[0]
    if (conv.in_channels, conv.out_channels) != (in_ch, out_ch):
        raise Unsupported(f"{name} maps {conv.in_channels}->{conv.out_channels} channels, "
                          f"expected {in_ch}->{out_ch}")
    if (conv.kernel_size != (k, k) or conv.stride != (1, 1) or conv.dilation != (1, 1)
            or conv.groups != 1 or conv.padding_mode != "zeros"
            or conv.padding != (k // 2, k // 2) or k % 2 == 0):
        raise Unsupported(f"{name} is not an odd square stride-1 conv with padding k//2")
    return k


def _check_bn(bn, name: str):
    """nn.BatchNorm2d (timm's BatchNormAct2d with identity act/drop included, and
    nn.SyncBatchNorm, whose global statistics the fused block computes); None if absent."""
    if bn is None or (isinstance(bn, nn.Sequential) and len(bn) == 0):
        return None
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise Unsupported(f"{name} is {type(bn).__name__}, not BatchNorm2d")
    for extra in ("act", "drop"):
        if not isinstance(getattr(bn, extra, nn.Identity()), nn.Identity):
            raise Unsupported(f"{name}.{extra} is not Identity")
    return bn


def _check_type(module, types, name):
    if not isinstance(module, types):
        raise Unsupported(f"{name} is {type(module).__name__}")


def _is_sigmoid(module):
    return isinstance(module, nn.Sigmoid) or type(module).__name__ == "Sigmoid"


# ---------------------------------------------------------------- fused wrappers

# Hooks that fire when a module is called. The fused block never calls the source
# block's children (their weights are read directly), so a hook on a child would silently
# stop firing: convert leaves such a block alone (also old-style weight_norm,
# spectral_norm and pruning, which recompute a child's weight in a forward pre-hook).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_children_hooks(source: nn.Module):
    for name, sub in source.named_modules():
        if sub is source:
            continue
        for kind in _CALL_HOOKS:
            hooks = getattr(sub, kind, None)
            if hooks:
                fns = ", ".join(getattr(h, "__qualname__", type(h).__name__)
                                for h in hooks.values())
                raise Unsupported(f"{name} has {kind[1:-1].replace('_', ' ')}s ({fns}), which "
                                  f"would not fire: the fused block does not call its children")


class _Wrapper(FusedCBAMBase):
    """Holds the source block's children under their own names; remembers the source.

    The source's own hooks (forward, pre-forward, backward, state-dict) stay in force:
    the wrapper shares the source's hook dictionaries, so a hook registered on either
    fires on the fused block and a hook handle removes it from both. The source's plain
    attributes (ultralytics' parse_model tags every layer with .i, .f, .type, .np) are
    copied onto the wrapper."""

    def __init__(self, source: nn.Module, children):
        super().__init__()
        _check_children_hooks(source)
        for name in children:
            setattr(self, name, getattr(source, name))
        object.__setattr__(self, "source", source)  # not a child: no duplicate state-dict keys
        self.training = source.training  # not train(): children keep their own modes
        for name, value in vars(source).items():
            if "hook" in name or not (name.startswith("_") or name in self.__dict__):
                self.__dict__[name] = value


class FusedTimmCbam(_Wrapper):
    """timm.layers.cbam.CbamModule / LightCbamModule, fused (amax tie semantics)."""

    def __init__(self, src):
        super().__init__(src, ("channel", "spatial"))
        light = type(src).__name__ == "LightCbamModule"
        ch = src.channel
        _check_type(ch.act, nn.ReLU, "channel.act")
        if not light and not _is_sigmoid(ch.gate):
            raise Unsupported(f"channel.gate is {type(ch.gate).__name__}, not sigmoid")
        if not _is_sigmoid(src.spatial.gate):
            raise Unsupported(f"spatial.gate is {type(src.spatial.gate).__name__}, not sigmoid")
        self.channels = ch.fc1.in_channels
        _check_conv(ch.fc1, self.channels, ch.fc1.out_channels, "channel.fc1")
        _check_conv(ch.fc2, ch.fc1.out_channels, self.channels, "channel.fc2")
        conv = src.spatial.conv
        if getattr(conv, "aa", None) is not None:
            raise Unsupported("spatial.conv has an anti-aliasing layer")
        k = _check_conv(conv.conv, 1 if light else 2, 1, "spatial.conv.conv")
        bn = _check_bn(conv.bn, "spatial.conv.bn")
        self.spec = CBAMSpec(channel_pool="mean(avg,max)" if light else "avg+max",
                             spatial_pool="mean(mean,max)" if light else "mean,max",
                             kernel_size=k, max_mode="amax", bn_eps=bn.eps if bn else 1e-5)

    def weights_and_bn(self):
        ch, conv_bn = child(self, "channel"), child(self, "spatial", "conv")
        fc1, fc2, conv = child(ch, "fc1"), child(ch, "fc2"), child(conv_bn, "conv")
        bn = _check_bn(child(conv_bn, "bn"), "spatial.conv.bn")
        return CBAMWeights(tensor(fc1, "weight"), tensor(fc1, "bias"), tensor(fc2, "weight"),
                           tensor(fc2, "bias"), tensor(conv, "weight"), tensor(conv, "bias"),
                           *bn_fields(bn)), bn


class FusedUltralyticsCBAM(_Wrapper):
    """ultralytics.nn.modules.conv.CBAM, fused (first-index max)."""

    def __init__(self, src):
        super().__init__(src, ("channel_attention", "spatial_attention"))
        ca, sa = src.channel_attention, src.spatial_attention
        if not (_is_sigmoid(ca.act) and _is_sigmoid(sa.act)):
            raise Unsupported("gates are not sigmoid")
        self.channels = ca.fc.in_channels
        _check_conv(ca.fc, self.channels, self.channels, "channel_attention.fc")
        k = _check_conv(sa.cv1, 2, 1, "spatial_attention.cv1")
        self.spec = CBAMSpec(channel_pool="avg", spatial_pool="mean,max", kernel_size=k,
                             max_mode="first")

    def weights_and_bn(self):
        fc, cv = child(self, "channel_attention", "fc"), child(self, "spatial_attention", "cv1")
        return CBAMWeights(tensor(fc, "weight"), tensor(fc, "bias"), None, None,
                           tensor(cv, "weight"), tensor(cv, "bias")), None


class FusedOfficialCBAM(_Wrapper):
    """The official implementation's CBAM (Jongchan/attention-module), fused (first-index max)."""

    def __init__(self, src):
        has_spatial = hasattr(src, "SpatialGate") and not getattr(src, "no_spatial", False)
        super().__init__(src, ("ChannelGate", "SpatialGate") if has_spatial else ("ChannelGate",))
        gate = src.ChannelGate
        pools = list(getattr(gate, "pool_types", ["avg", "max"]))
        if sorted(pools) == ["avg", "max"]:
            channel_pool = "avg+max"
        elif pools == ["avg"]:
            channel_pool = "avg"
        else:
            raise Unsupported(f"pool_types {pools}: only ['avg', 'max'] and ['avg'] are fused")
        mlp = list(gate.mlp)
        if len(mlp) != 4 or not isinstance(mlp[1], nn.Linear) or not isinstance(mlp[2], nn.ReLU) \
                or not isinstance(mlp[3], nn.Linear):
            raise Unsupported("ChannelGate.mlp is not Flatten, Linear, ReLU, Linear")
        self.channels = mlp[1].in_features
        k = 7
        if has_spatial:
            sp = src.SpatialGate.spatial
            if getattr(sp, "relu", None) is not None:
                raise Unsupported("SpatialGate.spatial has an activation")
            k = _check_conv(sp.conv, 2, 1, "SpatialGate.spatial.conv")
            bn = _check_bn(getattr(sp, "bn", None), "SpatialGate.spatial.bn")
        self.spec = CBAMSpec(channel_pool=channel_pool,
                             spatial_pool="max,mean" if has_spatial else None, kernel_size=k,
                             max_mode="first", bn_eps=bn.eps if has_spatial and bn else 1e-5)

    def weights_and_bn(self):
        return official_layout_weights(
            self, self.spec.has_spatial,
            resolve_bn=lambda bn: _check_bn(bn, "SpatialGate.spatial.bn"))


# ---------------------------------------------------------------- recognition and walk

def _fused_class(module) -> Optional[type]:
    """The wrapper class for a module that is a known CBAM block, else None."""
    cls = type(module).__name__
    if isinstance(module, FusedCBAMBase):
        return None
    if cls in ("CbamModule", "LightCbamModule") and hasattr(module, "channel") and hasattr(module, "spatial"):
        return FusedTimmCbam
    if hasattr(module, "channel_attention") and hasattr(module, "spatial_attention") and \
            hasattr(module.channel_attention, "fc"):
        return FusedUltralyticsCBAM
    if hasattr(module, "ChannelGate") and hasattr(module.ChannelGate, "mlp"):
        return FusedOfficialCBAM
    if "cbam" in cls.lower():
        return _UnknownCBAM
    return None


class _UnknownCBAM:
    def __init__(self, module):
        raise Unsupported("not a structure cbam_fused knows (timm, ultralytics, official)")


def convert(model: nn.Module, *, return_report: bool = False, verbose: bool = False):
    """Replace every recognized CBAM block in `model` (in place) with its fused equivalent.

    Returns the model (a new object only if `model` itself is a CBAM block), or
    (model, ConversionReport) with return_report=True. Blocks that look like CBAM but
    differ in a detail the fused path does not implement are left alone and named in
    the report; the report is also logged (and printed with verbose=True).
    """
    report = ConversionReport()
    model = _convert(model, "", report)
    log.info("%s", report)
    if verbose:
        print(report)
    if report.skipped:
        warnings.warn("\n".join(f"cbam_fused.convert left {n or '<root>'} ({c}) unfused: {why}"
                                for n, c, why in report.skipped), stacklevel=2)
    return (model, report) if return_report else model


def _convert(module, name, report):
    wrapper = _fused_class(module)
    if wrapper is not None:
        try:
            fused = wrapper(module)
        except Unsupported as why:
            report.skipped.append((name, type(module).__name__, str(why)))
            return module  # its children are parts of the block, not blocks of their own
        else:
            report.replaced.append((name, type(module).__name__))
            return fused
    for child_name, child in list(module.named_children()):
        new = _convert(child, f"{name}.{child_name}" if name else child_name, report)
        if new is not child:
            setattr(module, child_name, new)
    return module


def unconvert(model: nn.Module) -> nn.Module:
    """Put the original blocks back (they share every tensor with the fused wrappers)."""
    if isinstance(model, _Wrapper):
        model.source.training = model.training
        return model.source
    for child_name, child in list(model.named_children()):
        new = unconvert(child)
        if new is not child:
            setattr(model, child_name, new)
    return model
