"""Installs attn_fast. Two source folders live beside the package and are mapped into it:
``kernels/`` becomes ``attn_fast.kernels`` and ``reference/`` becomes ``attn_fast.reference``."""
from setuptools import setup

setup(
    name="attn_fast",
    version="0.1.0",
    description="Fused Triton kernels for attention layers: SDPA / multi-head attention, "
    "squeeze-and-excitation and CBAM, with PyTorch references and a CPU path.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["attn_fast", "attn_fast.ops", "attn_fast.nn", "attn_fast.kernels", "attn_fast.reference"],
    package_dir={
        "attn_fast": "attn_fast",
        "attn_fast.ops": "attn_fast/ops",
        "attn_fast.kernels": "kernels",
        "attn_fast.reference": "reference",
    },
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"],
        "bench": ["matplotlib>=3.5", "tqdm>=4"],
        "models": ["torchvision>=0.19", "timm>=1.0"],
    },
    entry_points={"console_scripts": ["attn-fast=attn_fast.__main__:main"]},
)
