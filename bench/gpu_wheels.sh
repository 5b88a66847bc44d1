#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels a lent GPU machine (Python 3.12, x86_64, no network) lacks, into
# .whl/ for `run(carry=[".whl"])`; bench/gpu_env.sh installs them there. Versions: those of constraints.txt / the
# dev venv (seen 2026-12-01: the GPU image has grpcio 1.84, no diffusers, redis, FastAPI, opentelemetry or openai).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  diffusers==0.42.1 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3 \
  googleapis-common-protos==1.76.0 protobuf==7.36.2 redis==8.1.0 peft==0.21.2 accelerate==1.15.0 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 pydantic==2.14.4 \
  pydantic_core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 h11==0.16.0 \
  anyio==4.16.0 sniffio==1.3.1 click==8.5.1 typing_extensions==4.16.0 opentelemetry-api==1.45.2 \
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 jiter==0.19.0 truststore==0.10.5 idna==3.20  # bench/load_gpu.py
ls .whl
