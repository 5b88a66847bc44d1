#!/usr/bin/env bash
# LoRA step-time and switch benchmark (bench/lora_gpu.py) on a lent GPU machine: the wheels its image lacks
# (diffusers, ...) travel in .whl/ when present, as for bench/gpu_smoke.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# A plain source tree: the server from the checkout, the SDK package from clients/python.
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 bench/lora_gpu.py "$@"
