#!/usr/bin/env bash
# Batching benchmark (bench/batching_gpu.py) on a lent GPU machine, set up as bench/gpu_smoke.sh does: the
# wheels the image lacks (diffusers, grpcio, ...) from .whl/ when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# A plain source tree: the server from the checkout, the SDK package from clients/python.
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 bench/batching_gpu.py "$@"
