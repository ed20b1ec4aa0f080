"""lpld: soft-label pruning for large-scale dataset distillation (LPLD, NeurIPS'24).

The pins below are the one place where versions are chosen. They were measured to install and
run together on a CPU-only machine and on CUDA 13 GPUs (see README.md, "Set-up"). The
``!=2.13.0+cpu`` excludes a CPU-only torch build that some machines keep locally: torchvision's
wheels link torch's CUDA libraries and fail to import next to it.
"""
from setuptools import setup

RUNTIME = [
    "torch==2.13.0,!=2.13.0+cpu",
    "torchvision==0.28.0",
    "triton==3.7.1",
    "nvidia-dali-cuda130==2.4.0",
    "numpy>=2.0,<3",
    "safetensors>=0.4,<1",
    "tqdm>=4.66,<5",
    "matplotlib==3.11.2",  # report plots (Agg backend, no display)
]
TEST = ["pytest>=8,<10", "pytest-benchmark>=5,<6", "hypothesis>=6.100,<7"]

setup(
    name="lpld",
    version="0.1.0",
    description="Fast soft-label pruning for large-scale dataset distillation (LPLD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lpld", "lpld_kernels"],
    package_dir={"lpld": "lpld", "lpld_kernels": "kernels"},
    install_requires=RUNTIME,
    extras_require={"test": TEST, "bench": TEST},
    entry_points={"console_scripts": ["lpld = lpld.cli:main"]},
)
