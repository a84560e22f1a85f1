"""torch.fx symbolic tracing of a model with fused CBAM blocks.

Symbolic tracing calls forward with a Proxy in place of the input and records the
operations done to it; the fused block does its work in Triton launches, which a Proxy
cannot pass through. So a fused block records itself as one node:

- a block inside the traced model becomes a leaf: a `call_module` node, as FX makes for
  nn.Conv2d or nn.BatchNorm2d. The GraphModule keeps the block as a submodule and calls
  it, so it runs the fused kernels, follows train()/eval() and updates its BatchNorm
  statistics exactly as in the original model. torchvision's and timm's
  create_feature_extractor see the block's output under its qualified name;
- a block that is itself the traced root cannot call itself: it becomes one
  `call_function` node of `fused_block`, with its weights as `get_attr` nodes. As for any
  Python value FX traces, the BatchNorm mode (batch statistics or running statistics)
  is the block's mode at trace time.
"""
import torch.fx

from .function import cbam_unchecked
from .spec import NUM_TENSOR_FIELDS, CBAMSpec, CBAMWeights
from .validation import check_inputs


def fused_block(x, channel_pool, spatial_pool, kernel_size, max_mode, bn_eps, has_bn,
                bn_training, bn_momentum, *tensors):
    """The fused block as one function of plain values (what an FX node can hold)."""
    spec = CBAMSpec(channel_pool, spatial_pool, kernel_size, max_mode, bn_eps)
    w = CBAMWeights(*tensors, has_bn)
    check_inputs(x, spec, w, bn_training)
    return cbam_unchecked(x, spec, w, bn_training=bn_training, bn_momentum=bn_momentum)


torch.fx.wrap("fused_block")  # recorded as one call_function node when called from here


def fx_call(block, x: torch.fx.Proxy):
    """The Proxy a fused block returns under symbolic tracing; see the module docstring."""
    from .modules import bn_mode

    tracer = x.tracer
    path = tracer.path_of_module(block)
    if path:
        return tracer.create_proxy("call_module", path, (x,), {})
    w, bn = block.weights_and_bn()
    bn_training, momentum = bn_mode(bn)
    s = block.spec
    return fused_block(x, s.channel_pool, s.spatial_pool, s.kernel_size, s.max_mode, s.bn_eps,
                       w.has_bn, bn_training, momentum, *w[:NUM_TENSOR_FIELDS])
