#!/usr/bin/env bash
# GPU smoke of every path (bench/gpu_smoke.py) on a lent GPU machine: its image lacks diffusers, a new enough
# grpcio and redis, which travel as wheels in .whl/ (bench/gpu_wheels.sh downloads them).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
exec python3 bench/gpu_smoke.py "$@"
