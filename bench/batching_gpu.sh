#!/usr/bin/env bash
# Batching benchmark (bench/batching_gpu.py) on a lent GPU machine, set up as bench/gpu_smoke.sh does: the
# wheels the image lacks (diffusers, grpcio, ...) from .whl/ when present.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
exec python3 bench/batching_gpu.py "$@"
