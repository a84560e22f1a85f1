"""Triton device code for cbam_fused (installed as the subpackage cbam_fused.kernels).

pool_stats    F1/F2: sum, max, argmax and tie count along one axis, in split partials
channel_gate  phi forward and backward: combine F1's partials, the MLP, the channel gate
spatial_gate  psi forward and backward: combine F2's partials, the k x k conv, BatchNorm
gate_apply    F3: [BatchNorm finalize,] out = x * ca * sa
backward      B1/B2/B3: the fused backward of the big passes
weight_grads  every parameter gradient of phi and psi, summed over samples
plane         addressing, NaN-aware max statistics, fixed-order combines shared by all
"""
