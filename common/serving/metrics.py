"""Prometheus metrics of every service (one registry per process; `service` labels tell them apart in `all`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from imagegen.common.serving.config import ConfigError

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("imagegen_requests", "RPCs handled, by final status code", ["service", "method", "code"])
REQUEST_SECONDS = Histogram(
    "imagegen_request_seconds", "RPC handling time", ["service", "method"], buckets=_LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "imagegen_stage_seconds",
    "Time in each stage: encode, vae_encode, queue_wait, denoise, vae_decode",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("imagegen_queue_depth", "Jobs waiting in the denoiser queue (not counting the running one)")
QUEUE_CAPACITY = Gauge("imagegen_queue_capacity", "Jobs the denoiser queue holds before RESOURCE_EXHAUSTED")
JOBS = Counter("imagegen_denoise_jobs", "Denoise jobs by outcome: ok, cancelled, deadline, error", ["outcome"])
DENOISE_STEPS = Counter("imagegen_denoise_steps", "Denoising steps run")
BATCH_SIZE = Histogram(
    "imagegen_denoise_batch_size",
    "Jobs per denoiser batch (with --max-batch > 1)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
BATCH_WAIT_SECONDS = Histogram(
    "imagegen_denoise_batch_wait_seconds",
    "Time the denoiser waited for compatible jobs to fill a batch (at most --batch-wait-ms)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
CACHE_LOOKUPS = Counter(
    "imagegen_cache_lookups", "Embedding cache lookups: hit, miss, error", ["service", "store", "result"]
)
CACHE_INLINE_FALLBACKS = Counter(
    "imagegen_cache_inline_fallbacks", "Embeddings passed inline because the shared cache failed", ["service"]
)
TEXT_ENCODER_CALLS = Counter("imagegen_text_encoder_calls", "Prompts run through the text encoder")
BACKEND_RETRIES = Counter("imagegen_backend_retries", "Internal calls retried after UNAVAILABLE", ["backend"])
EMBEDDING_REFETCHES = Counter(
    "imagegen_embedding_refetches", "Denoise calls repeated with inline embeddings after a cache miss at the denoiser"
)


def start_metrics_server(port: int, host: str) -> object | None:
    """Serve `/metrics` over HTTP on `port` (0: disabled); returns the server, to shut down on exit."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror}") from exc
    return server
