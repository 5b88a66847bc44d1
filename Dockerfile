# syntax=docker/dockerfile:1
#
# The imagegen services image: the `imagegen` CLI with every service (`imagegen serve gateway|encoder|denoiser|vae|all`,
# docs/services.md), `imagegen make-tiny`, and torchrun for denoiser groups. The Helm chart (helm/imagegen) runs it.
#
# Build, from the repository root (no model weights go into the image):
#
#   docker build -t ghcr.io/imagegen/imagegen:0.1.0 .
#       GPU image: torch's PyPI wheels for linux/x86_64 bundle the CUDA runtime (nvidia-* packages), so a node
#       needs only the NVIDIA driver and container toolkit (in Kubernetes: the NVIDIA device plugin / GPU operator).
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t imagegen:cpu .
#       CPU-only image (several GB smaller), e.g. for the chart's CPU demo (helm/imagegen/ci/cpu-tiny-values.yaml).
#
# Versions are pinned by constraints.txt (the set CI tests); pass --build-arg CONSTRAINTS=/dev/null to take the
# newest releases within pyproject.toml's ranges instead.
#
# Run:
#
#   docker run --rm imagegen:cpu make-tiny --family qwen-image --out /tmp/tiny      # the CLI is the entrypoint
#   docker run --rm --gpus all -p 50051:50051 -v /srv/models:/models:ro \
#       ghcr.io/imagegen/imagegen:0.1.0 serve all --model /models/Qwen-Image --device cuda
#
# Runtime contract with the chart: uid/gid 10001 (non-root), everything works on a read-only root filesystem
# given writable /tmp and /cache (HOME and the Hugging Face / torch / triton / imagegen caches point there), the
# ports of docs/services.md (gRPC 50051-50054, HTTP 8000, metrics 9100-9103), and no health-check instruction (Kubernetes
# uses native gRPC probes on grpc.health.v1).

ARG PYTHON_VERSION=3.11

# --- build: a self-contained virtual environment in /opt/venv -------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=""
ARG CONSTRAINTS=constraints.txt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer, so that a source change does not reinstall torch.
# imagegen-client (clients/python, the SDK and public stubs the server imports) comes from the source, below; its
# own dependencies are the server's too.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        | grep -v '^imagegen-client' > /tmp/requirements.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} -c "${CONSTRAINTS}" -r /tmp/requirements.txt

# The project itself (package imagegen, with common/ and services/ installed inside it; the generated gRPC code is
# checked in). COPY keeps imagegen/common and imagegen/services as the relative symlinks they are, and common/ and
# services/ land beside them, so the links resolve; the wheel pip builds holds the real files.
COPY README.md ./
COPY imagegen ./imagegen
COPY common ./common
COPY services ./services
COPY clients/python ./clients/python
RUN pip install --no-deps ./clients/python . \
    && imagegen --help >/dev/null

# --- runtime -----------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="imagegen" \
      org.opencontainers.image.description="gRPC serving for Qwen-Image, Qwen-Image-Edit(-Plus) and Z-Image" \
      org.opencontainers.image.licenses="Apache-2.0"

# The non-root user of the chart's podSecurityContext. /cache is its home and the cache root; /models is where the
# chart mounts the weights (read-only).
RUN groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid 10001 --home-dir /cache --no-create-home --shell /usr/sbin/nologin imagegen \
    && mkdir -p /cache /models \
    && chown 10001:10001 /cache

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    IMAGEGEN_CACHE=/cache/imagegen

USER 10001:10001
WORKDIR /cache
EXPOSE 50051 50052 50053 50054 8000 9100 9101 9102 9103
ENTRYPOINT ["imagegen"]
CMD ["--help"]
