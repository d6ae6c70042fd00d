#!/usr/bin/env bash
# The one command for a GPU machine (see benchmarks/gpu_check.py): installs the wheels benchmarks/gpu_wheels.sh put
# in .whl/ (carried along) over the machine's own PyTorch, then runs the check and writes its report to OUT.
#   bash benchmarks/gpu_check.sh OUT [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT [options]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# the work files (weights, shards, runs) stay on the machine: only the report comes back
python3 benchmarks/gpu_check.py --out "$out" --work /tmp/gpu_check_work "$@"
