"""Build for rmt_fast.

The Triton kernels in ``kernels/`` install as ``rmt_fast.kernels`` (a top-level ``kernels`` package
would clash with an existing PyPI package).
"""
from setuptools import setup

setup(
    name="rmt_fast",
    version="0.1.0",
    description="Fast inference and training for Recurrent Memory Transformers over very long inputs",
    python_requires=">=3.10",
    packages=["rmt_fast", "rmt_fast.engine", "rmt_fast.analysis", "rmt_fast.kernels"],
    package_dir={"rmt_fast.kernels": "kernels"},
    # bert-base-cased vocabulary and config (the built-in default shape) and the background novels.
    package_data={"rmt_fast": ["data/SOURCES.md", "data/bert-base-cased/*", "data/noise/*.txt.gz"]},
    install_requires=[
        "torch>=2.4", "transformers>=4.40", "numpy", "safetensors", "tqdm", "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton"]},
    entry_points={"console_scripts": ["rmt-fast=rmt_fast.cli:main"]},
)
