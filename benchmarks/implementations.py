"""Build the module a benchmark case times (cases.IMPLS), in the case's device and dtype.

Every implementation but "official" and "ultralytics" starts from one timm CbamModule
(or, without timm, its structural copy), so cbam_fused, eager timm and the compiled
versions compute the same block with the same weights. torch.compile is called with
dynamic=False: the benchmark shapes are static, as in a training loop.
"""
import copy

import pytest
import torch

from eager_modules import OfficialCBAM, eager_timm

COMPILE_MODES = {"compile-default": None, "compile-max-autotune": "max-autotune",
                 "cbam_fused-compile": None}


def uses_cuda_graphs(impl):
    """torch.compile's max-autotune mode runs the compiled code as CUDA graphs
    (cudagraph trees): each training step must call cudagraph_mark_step_begin()."""
    return impl == "compile-max-autotune"


def _ultralytics_cbam(C):
    try:
        from ultralytics.nn.modules.conv import CBAM
    except ImportError as e:
        pytest.skip(f"ultralytics not installed ({e})")
    return CBAM(C)


def build(case, device):
    """The module (or compiled callable) for `case`, on `device`, in the case's dtype and
    mode (eval for the forward, train for forward+backward)."""
    import cbam_fused

    C = case.shape[1]
    torch.manual_seed(0)
    if case.impl == "official":
        module = OfficialCBAM(C)
    elif case.impl == "ultralytics":
        module = _ultralytics_cbam(C)
    else:
        module = eager_timm(C)[1]
    module = module.to(device=device, dtype=case.torch_dtype)
    module.train(case.direction == "fwdbwd")
    if case.impl in ("cbam_fused", "cbam_fused-compile"):
        module = cbam_fused.convert(copy.deepcopy(module))
    if case.impl in COMPILE_MODES:
        return module, torch.compile(module, mode=COMPILE_MODES[case.impl], dynamic=False)
    return module, module
