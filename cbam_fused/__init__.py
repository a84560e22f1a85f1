"""cbam_fused: a drop-in CBAM block whose work on the big activation runs in fused Triton passes.

CBAM          nn.Module, the paper/official block by default (modules.py)
cbam          functional entry point (function.py)
CBAMSpec      which variant: pools, pool order, max semantics (spec.py)
CBAMWeights   the small maps' tensors (spec.py)
cbam_reference  the plain PyTorch oracle (reference.py)
convert       swap the CBAM blocks of timm / ultralytics / official models for fused ones (convert.py)
record_attention  record the channel and spatial gates of every fused block (attention.py)
"""
from .function import CBAMFunction, cbam, uses_kernels
from .modules import CBAM, FusedCBAMBase
from .reference import cbam_reference
from .spec import CBAMSpec, CBAMWeights

__all__ = ["CBAM", "CBAMFunction", "CBAMSpec", "CBAMWeights", "FusedCBAMBase", "cbam",
           "cbam_reference", "uses_kernels"]
from .convert import ConversionReport, convert, unconvert  # noqa: E402
from .attention import AttentionMaps, record_attention  # noqa: E402

__all__ += ["AttentionMaps", "ConversionReport", "convert", "record_attention", "unconvert"]
