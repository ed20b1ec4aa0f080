"""lpld: soft-label pruning for large-scale dataset distillation (LPLD, NeurIPS'24).

Dependencies are ranges, so lpld installs next to the torch a user already has instead of
replacing it. CI runs the whole suite at both ends (README.md, "Set-up"): the lower end is
``tests/requirements-oldest.txt`` (torch 2.11 / torchvision 0.26 / triton 3.6, the GPU check
machine's versions, without nvidia-dali), the upper end whatever ``pip install -e ".[test]"``
resolves to on the CI machine. ``!=2.13.0+cpu`` keeps pip from settling on a CPU-only torch file
that some machines keep locally: torchvision's wheels link torch's CUDA libraries and fail to
import next to it. nvidia-dali is installed by default; lpld runs without it (torch replay).
"""
from setuptools import setup

RUNTIME = [
    "torch>=2.11,<3,!=2.13.0+cpu",
    "torchvision>=0.26,<1",
    "triton>=3.6,<4",
    "nvidia-dali-cuda130>=2.4,<3",
    "numpy>=2.0,<3",
    "safetensors>=0.4,<1",
    "tqdm>=4.66,<5",
    "matplotlib>=3.9,<4",  # report plots (Agg backend, no display)
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
