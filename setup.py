"""cbam_fused: host code in cbam_fused/, Triton device code in kernels/ (installed as cbam_fused.kernels)."""
from setuptools import setup

setup(
    name="cbam_fused",
    version="0.1.0",
    description="Fused Triton CBAM (Convolutional Block Attention Module) for PyTorch",
    packages=["cbam_fused", "cbam_fused.kernels"],
    package_dir={"cbam_fused": "cbam_fused", "cbam_fused.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
)
