"""What each CBAM block attends to: record the channel and spatial gates of a forward.

    with cbam_fused.record_attention(model) as maps:
        model(x)
    maps["layer1.0.se"].channel   # [N, C] channel gate, values in (0, 1)
    maps["layer1.0.se"].spatial   # [N, 1, H, W] spatial gate, or None without one

The fused block computes both gates on its way (ca after phi, sa after psi), so
recording them costs no pass over x: the recorder copies the two small rows out of the
block's workspace (fp32, detached, on the block's device). Works on any model after
`convert()` (timm, ultralytics, official structure) and on `cbam_fused.CBAM`: every
`FusedCBAMBase` in the model is recorded under its qualified module name, in the order
the forward runs them (a block that runs twice keeps its last call). Nothing is recorded,
and the blocks hold no reference to the recorder, once the `with` block exits. Outputs,
gradients and launches of the block itself are unchanged. Inside torch.compile the
recorder refuses with an error (the gates leave the graph as Python side effects).
"""
import contextlib
import dataclasses
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class AttentionMaps:
    """The gates of one block call: channel [N, C], spatial [N, 1, H, W] or None."""
    channel: torch.Tensor
    spatial: Optional[torch.Tensor]


class _Recorder:
    def __init__(self, name: str, sink: "OrderedDict[str, AttentionMaps]"):
        self.name = name
        self.sink = sink

    def __call__(self, ca: torch.Tensor, sa: Optional[torch.Tensor], shape):
        N, C, H, W = shape
        channel = ca.detach().reshape(N, C).to(torch.float32, copy=True)
        spatial = None
        if sa is not None:
            spatial = sa.detach().reshape(N, 1, H, W).to(torch.float32, copy=True)
        self.sink.pop(self.name, None)  # keep forward order of the last call
        self.sink[self.name] = AttentionMaps(channel, spatial)


# The active recorders, by id() of the block they record. Kept outside the blocks, so a
# copy of a block (copy.deepcopy, pickle: an EMA model, a checkpoint) made inside the
# `with` block records nothing and can be recorded on its own. The blocks are alive while
# they are in here: record_attention holds them until it removes them.
_RECORDERS = {}


@contextlib.contextmanager
def record_attention(model: nn.Module):
    """Record the gates of every fused CBAM block in `model` during the `with` block;
    yields an ordered dict {qualified module name: AttentionMaps}."""
    from .modules import FusedCBAMBase

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedCBAMBase)]
    if not blocks:
        raise ValueError("record_attention: the model has no fused CBAM block; convert it "
                         "first with cbam_fused.convert(model)")
    maps: "OrderedDict[str, AttentionMaps]" = OrderedDict()
    for name, m in blocks:
        if id(m) in _RECORDERS:
            raise RuntimeError(f"record_attention: block {name or '<root>'} is already being "
                               f"recorded (nested record_attention on the same model)")
    for name, m in blocks:
        _RECORDERS[id(m)] = _Recorder(name, maps)
    try:
        yield maps
    finally:
        for _, m in blocks:
            _RECORDERS.pop(id(m), None)


def recorder_of(module: nn.Module):
    """The active recorder of a fused block, or None."""
    rec = _RECORDERS.get(id(module))
    if rec is not None and torch.compiler.is_compiling():
        raise RuntimeError("cbam_fused.record_attention does not work inside torch.compile: "
                           "record with the uncompiled model")
    return rec
