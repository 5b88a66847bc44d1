#!/usr/bin/env bash
# LoRA step-time and switch benchmark (bench/lora_gpu.py) on a lent GPU machine: the wheels its image lacks
# (diffusers, ...) travel in .whl/ when present, as for bench/gpu_smoke.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
exec python3 bench/lora_gpu.py "$@"
