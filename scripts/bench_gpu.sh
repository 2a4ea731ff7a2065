#!/usr/bin/env bash
# On a GPU machine without diffalign's dependencies: install the carried wheels (.devcarry/wheels, not committed)
# without touching the machine's torch, then run the benchmark. Results: $OUT/bench_gpu.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .devcarry/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --find-links .devcarry/wheels .devcarry/wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 scripts/bench_gpu.py --out "${OUT:-bench_out}" "$@"
