#!/usr/bin/env bash
# The GPU load test (bench/load_gpu.py) on a lent GPU machine: `serve all` with full-size random-weight modules
# under 8 concurrent gRPC and HTTP callers. Its image lacks diffusers, grpcio, redis, FastAPI and the openai
# client, which travel as wheels in .whl/ (bench/gpu_wheels.sh downloads them). Phases: see the script's --help.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
exec python3 bench/load_gpu.py "$@"
