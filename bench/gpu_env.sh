# Sourced by the bench/*_gpu.sh scripts: a lent GPU machine's Python environment for a plain source tree.
# Its image lacks diffusers, redis, FastAPI and a new enough grpcio; they travel as wheels in .whl/
# (bench/gpu_wheels.sh downloads them here) and install into /tmp/site, ahead of the image's own packages.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The server from the checkout, the SDK package from clients/python.
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
