#!/usr/bin/env bash
# GPU smoke of every path (bench/gpu_smoke.py) on a lent GPU machine: its image lacks diffusers, a new enough
# grpcio and redis, which travel as wheels in .whl/ (see docs/benchmarks.md for the download command).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# A plain source tree: the server from the checkout, the SDK package from clients/python.
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
exec python3 bench/gpu_smoke.py "$@"
