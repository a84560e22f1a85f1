"""cbam_fused: host code in cbam_fused/, Triton device code in kernels/ (installed as cbam_fused.kernels).

Supported and tested versions (README, "Versions"):
- torch 2.14.1 with triton 3.8.0: the pins of requirements.txt; CI runs the CPU suite on them.
- torch 2.11.0 with triton 3.6.0: the GPU machine image; the CUDA suite (make gpu-check) and
  the CPU suite run on them. The CPU suite there needs numpy < 2.4 (triton 3.6's interpreter
  converts one-element arrays with int(), which numpy 2.4 rejects).
Older releases are not tested and not claimed.
"""
from setuptools import setup

setup(
    name="cbam_fused",
    version="0.1.0",
    description="Fused Triton CBAM (Convolutional Block Attention Module) for PyTorch",
    packages=["cbam_fused", "cbam_fused.kernels"],
    package_dir={"cbam_fused": "cbam_fused", "cbam_fused.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6"],
)
