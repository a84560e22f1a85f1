"""Triton device code for cbam_fused (installed as the subpackage cbam_fused.kernels).

pool_stats  F1/F2: sum, max, argmax and tie count along one axis, plus the merge of split partials
gate_apply  F3: out = x * ca * sa
backward    B1/B2/B3: the fused backward
plane       addressing and NaN-aware max statistics shared by all of them
"""
