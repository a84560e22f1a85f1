"""What a CBAM variant is: a hashable spec for the structure and a tuple of weights.

The big passes are the same for every variant (docs/design.md section 3); only the small
maps phi (channel) and psi (spatial) differ. CBAMSpec names those differences, so
one fused implementation serves the paper/official block, timm's CbamModule and
LightCbamModule, and ultralytics' CBAM.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# phi's input. "avg+max": MLP(avg) + MLP(max) (paper, official, timm);
# "mean(avg,max)": MLP(0.5*avg + 0.5*max) (timm Light); "avg": MLP(avg) (ultralytics).
CHANNEL_POOLS = ("avg+max", "mean(avg,max)", "avg")
# psi's input maps, in channel order of the conv. None: no spatial gate (official no_spatial).
SPATIAL_POOLS = ("max,mean", "mean,max", "mean(mean,max)", None)
# "first": torch.max semantics, the gradient goes to the first maximum (official, ultralytics).
# "amax": torch.amax semantics, the gradient is split evenly among tied maxima (timm).
MAX_MODES = ("first", "amax")


@dataclass(frozen=True)
class CBAMSpec:
    channel_pool: str = "avg+max"
    spatial_pool: Optional[str] = "max,mean"
    kernel_size: int = 7
    max_mode: str = "first"
    bn_eps: float = 1e-5

    def __post_init__(self):
        if self.channel_pool not in CHANNEL_POOLS:
            raise ValueError(f"channel_pool must be one of {CHANNEL_POOLS}, got {self.channel_pool!r}")
        if self.spatial_pool not in SPATIAL_POOLS:
            raise ValueError(f"spatial_pool must be one of {SPATIAL_POOLS}, got {self.spatial_pool!r}")
        if self.max_mode not in MAX_MODES:
            raise ValueError(f"max_mode must be one of {MAX_MODES}, got {self.max_mode!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    @property
    def has_spatial(self) -> bool:
        return self.spatial_pool is not None

    @property
    def spatial_maps(self) -> int:
        """Input channels of the spatial conv."""
        return 1 if self.spatial_pool == "mean(mean,max)" else 2

    @property
    def amax(self) -> bool:
        return self.max_mode == "amax"


class CBAMWeights(NamedTuple):
    """The tensors of phi and psi, in the shapes the source modules store them.

    fc1/fc2 weights may be Linear-shaped [out, in] or 1x1-conv-shaped [out, in, 1, 1].
    A one-layer channel map (ultralytics: one 1x1 conv C->C) has fc2_weight None.
    The spatial conv weight is [1, spec.spatial_maps, k, k]. BatchNorm entries are
    None where the variant has no BatchNorm (or no affine / no running stats). In
    batch-statistics mode the running statistics and the batch counter are updated in
    place by the forward, as nn.BatchNorm2d does.
    """
    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor] = None
    fc2_weight: Optional[torch.Tensor] = None
    fc2_bias: Optional[torch.Tensor] = None
    conv_weight: Optional[torch.Tensor] = None
    conv_bias: Optional[torch.Tensor] = None
    bn_weight: Optional[torch.Tensor] = None
    bn_bias: Optional[torch.Tensor] = None
    bn_running_mean: Optional[torch.Tensor] = None
    bn_running_var: Optional[torch.Tensor] = None
    bn_num_batches_tracked: Optional[torch.Tensor] = None
    has_bn: bool = False

    def tensors(self):
        """(name, tensor) for every tensor present."""
        return [(k, v) for k, v in zip(self._fields, self) if isinstance(v, torch.Tensor)]


# Index of the first tensor field and the number of tensor fields; has_bn is last.
NUM_TENSOR_FIELDS = len(CBAMWeights._fields) - 1
