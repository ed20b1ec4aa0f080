#!/usr/bin/env bash
# Everything a lent GPU can prove, in one command (target: under 8 minutes on one H100):
#   bash benchmarks/run_gpu.sh
# 1. the gpu-marked tests (kernels on CUDA in fp32/bf16/fp16 and both layouts, DALI GPU replay,
#    Triton inside torch.compile, recover's compile/channels_last/bf16, no host syncs in steady state);
# 2. every benchmark suite, each writing benchmarks/results/<suite>-<gpu>.json with its command, then
#    the README table and benchmarks/report/index.html regenerated from all results.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m gpu tests
python -m pytest -q benchmarks --benchmark-enable
python -m benchmarks.report --readme  # the README's benchmark table, now with this GPU's column
