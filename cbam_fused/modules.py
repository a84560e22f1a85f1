"""nn.Module front ends of the fused block.

`FusedCBAMBase` holds the forward logic every fused module shares: read the
weights, validate, resolve the BatchNorm mode, call the functional op. A
subclass only says where its weights live (`fused_weights`) and which variant it
is (`spec`). `CBAM` is the paper/official block with the official state-dict keys
(`ChannelGate.mlp.1.weight`, `SpatialGate.spatial.conv.weight`, ...), so official
checkpoints load into it unchanged.
"""
import warnings
from typing import Optional

import torch
from torch import nn
from torch.fx import Proxy

from .attention import recorder_of
from .function import cbam_unchecked
from .fx import fx_call
from .spec import CBAMSpec, CBAMWeights
from .sync_bn import sync_group
from .validation import check_inputs


# Every call of a fused block reads its weights from the module tree. The plain spelling
# (`self.channel.fc1.weight`) goes through nn.Module.__getattr__, the fallback Python
# calls for children, parameters and buffers: about half a microsecond per name, some
# 20 names per call. `child` and `tensor` read the same registries directly, and fall back
# to getattr for a name that is not registered there (a parametrization's property).

def child(module: nn.Module, *path: str) -> nn.Module:
    """module.<path[0]>.<path[1]>...: registered children (Sequential items by index
    string), read from _modules."""
    for name in path:
        children = module._modules
        module = children[name] if name in children else getattr(module, name)
    return module


def tensor(module: nn.Module, name: str):
    """module.<name> for a parameter or buffer (None when registered as None)."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


_NO_BN = (None, None, None, None, None, False)


def bn_fields(bn: Optional[nn.BatchNorm2d]) -> tuple:
    """The last six CBAMWeights fields (bn_weight ... bn_num_batches_tracked, has_bn) of a
    BatchNorm2d, or of none."""
    if bn is None:
        return _NO_BN
    nbt = tensor(bn, "num_batches_tracked") if bn.track_running_stats else None
    return (tensor(bn, "weight"), tensor(bn, "bias"), tensor(bn, "running_mean"),
            tensor(bn, "running_var"), nbt, True)


def bn_mode(bn: Optional[nn.BatchNorm2d]):
    """(use batch statistics?, momentum) as nn.BatchNorm2d.forward would resolve them."""
    if bn is None:
        return False, 0.0
    momentum = 0.0 if bn.momentum is None else bn.momentum
    training = bn.training
    if training and bn.track_running_stats:
        nbt = tensor(bn, "num_batches_tracked")
        if nbt is not None and bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(nbt + 1)
    return training or tensor(bn, "running_mean") is None, momentum


def official_layout_weights(block: nn.Module, has_spatial: bool, resolve_bn=None):
    """(CBAMWeights, spatial BatchNorm or None) of a block laid out as the official CBAM:
    ChannelGate.mlp.{1,3} (one Linear at .1 when the MLP has a single layer) and
    SpatialGate.spatial.{conv,bn}. resolve_bn(bn) checks or maps the BatchNorm found
    there (a wrapped source block's may be absent or unsupported)."""
    mlp = child(block, "ChannelGate", "mlp")
    fc1 = child(mlp, "1")
    fc2_weight = fc2_bias = None
    if len(mlp._modules) > 2:
        fc2 = child(mlp, "3")
        fc2_weight, fc2_bias = tensor(fc2, "weight"), tensor(fc2, "bias")
    if not has_spatial:
        return CBAMWeights(tensor(fc1, "weight"), tensor(fc1, "bias"), fc2_weight, fc2_bias), None
    sp = child(block, "SpatialGate", "spatial")
    conv = child(sp, "conv")
    bn = sp._modules["bn"] if "bn" in sp._modules else getattr(sp, "bn", None)
    if resolve_bn is not None:
        bn = resolve_bn(bn)
    return CBAMWeights(tensor(fc1, "weight"), tensor(fc1, "bias"), fc2_weight, fc2_bias,
                       tensor(conv, "weight"), tensor(conv, "bias"), *bn_fields(bn)), bn


class FusedCBAMBase(nn.Module):
    """Shared forward: validate, then one fused op. Subclasses set `spec` and `channels`,
    and implement `weights_and_bn()`: (CBAMWeights, the spatial BatchNorm module or None)."""
    spec: CBAMSpec
    channels: int

    def weights_and_bn(self):
        raise NotImplementedError

    def fused_weights(self) -> CBAMWeights:
        return self.weights_and_bn()[0]

    def spatial_bn(self) -> Optional[nn.BatchNorm2d]:
        return self.weights_and_bn()[1]

    def forward(self, x):
        if isinstance(x, Proxy):  # torch.fx symbolic tracing (fx.py)
            return fx_call(self, x)
        if torch.jit.is_tracing():
            # the input checks compare x's sizes with the weights' (C, and N > 0): facts a
            # trace may keep as constants, not the data flow TracerWarning is about
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x):
        w, bn = self.weights_and_bn()
        bn_training, momentum = bn_mode(bn)
        check_inputs(x, self.spec, w, bn_training, self.channels)
        group = sync_group(bn)  # SyncBatchNorm in training: global batch statistics
        # the batch counter (num_batches_tracked) is counted by the forward, as by nn.BatchNorm2d
        return cbam_unchecked(x, self.spec, w, bn_training=bn_training, bn_momentum=momentum,
                              bn_group=group, gates=recorder_of(self))

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every submodule before compiling it: refuse
        with what to do instead (TorchScript cannot compile the Python that launches the
        Triton kernels)."""
        raise RuntimeError(
            f"cbam_fused: torch.jit.script cannot compile the fused CBAM block "
            f"{type(self).__name__} (its kernels are Triton launches made from Python). "
            f"Use torch.jit.trace, torch.export or torch.onnx.export, which record the "
            f"block as plain PyTorch ops or as the registered cbam_fused op, or script the "
            f"unconverted model: torch.jit.script(cbam_fused.unconvert(copy.deepcopy(model)))")


class _ConvBN(nn.Module):
    """conv (+ BatchNorm), the official BasicConv without activation."""

    def __init__(self, in_maps, kernel_size, conv_bias, bn, bn_momentum, bn_eps):
        super().__init__()
        self.conv = nn.Conv2d(in_maps, 1, kernel_size, padding=kernel_size // 2, bias=conv_bias)
        self.bn = nn.BatchNorm2d(1, eps=bn_eps, momentum=bn_momentum) if bn else None


class ChannelGate(nn.Module):
    def __init__(self, channels, hidden, bias, two_layers):
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(channels, hidden if two_layers else channels, bias=bias)]
        if two_layers:
            layers += [nn.ReLU(), nn.Linear(hidden, channels, bias=bias)]
        self.mlp = nn.Sequential(*layers)


class SpatialGate(nn.Module):
    def __init__(self, in_maps, kernel_size, conv_bias, bn, bn_momentum, bn_eps):
        super().__init__()
        self.spatial = _ConvBN(in_maps, kernel_size, conv_bias, bn, bn_momentum, bn_eps)


class CBAM(FusedCBAMBase):
    """Fused CBAM; by default the paper/official block (Jongchan/attention-module).

    channels         C
    reduction        hidden size floor(C / reduction), at least 1 (or hidden_channels)
    kernel_size      spatial conv size k (padding k // 2)
    channel_pool     "avg+max" (MLP(avg) + MLP(max)), "mean(avg,max)" (timm Light), "avg"
    channel_mlp      True: Linear-ReLU-Linear; False: one Linear C -> C (ultralytics)
    spatial_pool     "max,mean" (official order), "mean,max" (timm, ultralytics),
                     "mean(mean,max)" (timm Light, one map), None (no spatial gate)
    mlp_bias, conv_bias, spatial_bn, bn_momentum, bn_eps: as named (official: True,
                     False, True, 0.01, 1e-5)
    max_mode         "first" (torch.max: gradient to the first maximum) or "amax"
                     (gradient split among ties, as timm)
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, *,
                 hidden_channels: Optional[int] = None, channel_pool: str = "avg+max",
                 channel_mlp: bool = True, spatial_pool: Optional[str] = "max,mean",
                 mlp_bias: bool = True, conv_bias: bool = False, spatial_bn: bool = True,
                 bn_momentum: Optional[float] = 0.01, bn_eps: float = 1e-5,
                 max_mode: str = "first"):
        super().__init__()
        self.channels = channels
        self.spec = CBAMSpec(channel_pool=channel_pool, spatial_pool=spatial_pool,
                             kernel_size=kernel_size, max_mode=max_mode, bn_eps=bn_eps)
        hidden = hidden_channels if hidden_channels is not None else max(1, channels // reduction)
        self.ChannelGate = ChannelGate(channels, hidden, mlp_bias, channel_mlp)
        if self.spec.has_spatial:
            self.SpatialGate = SpatialGate(self.spec.spatial_maps, kernel_size, conv_bias,
                                           spatial_bn, bn_momentum, bn_eps)

    def weights_and_bn(self):
        return official_layout_weights(self, self.spec.has_spatial)

    def extra_repr(self):
        return f"channels={self.channels}, spec={self.spec}"
