#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, docs/benchmarks.md "GPU check") on a machine with one GPU and no
# diffusers: installs the wheels carried in .gpu_check/ (written here by `python benchmarks/gpu_check.py --prepare`),
# then runs the check; the JSON lands in $OUT (the device tool's folder) or .gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_check/wheels/*.whl
PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "$@"
