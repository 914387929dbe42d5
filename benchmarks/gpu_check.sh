#!/usr/bin/env bash
# Device-machine entry point for benchmarks/gpu_check.py: the GPU image has torch but not all
# of seqserve's dependencies, so wheels carried in .whl/ are installed to a side directory.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m benchmarks.gpu_check --out "${OUT:-/tmp/out}"
