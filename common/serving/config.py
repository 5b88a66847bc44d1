"""Flags that also read environment variables (flags win), with the defaults docs/services.md documents."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from imagegen.common.errors import ImagegenError
from imagegen.common.options import Limits
from imagegen.common.stage_settings import DEFAULT_CACHE_ROOT


class ConfigError(ImagegenError):
    """A service cannot start with these flags."""


# SIGTERM's drain: long enough for a deep GPU queue to empty (16 queued 1024^2 / 50-step Qwen-Image jobs with CFG
# are ~200 s on an H200), so a rolling update does not cut requests off and send their callers to the back of
# another queue. Work still in flight after it is cancelled (and retried elsewhere by the gateway or the SDK).
DRAIN_TIMEOUT_S = 300.0
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in TRUE | FALSE:
        raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {value!r}")
    return lowered in TRUE


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
    **kwargs: Any,
) -> None:
    """`flag` whose default is `$env` when set; argparse converts and checks a string default with `type`."""
    value = os.environ.get(env)
    shown = "unset" if default is None else default
    parser.add_argument(
        flag,
        type=type,
        default=value if value is not None else default,
        help=f"{help} [env {env}; default {shown}]",
        **kwargs,
    )


def add_switch(parser: argparse.ArgumentParser, flag: str, env: str, help: str) -> None:
    """A boolean flag (`--x` turns it on) whose default comes from `$env` (1/true/yes)."""
    value = os.environ.get(env)
    default = env_bool(value) if value is not None else False
    parser.add_argument(flag, action="store_true", default=default, help=f"{help} [env {env}; default off]")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


PUBLIC_HOST, INTERNAL_HOST = "0.0.0.0", "127.0.0.1"


def bind_host(host: str | None, public: bool) -> str:
    """--host, else every interface for the public gateway and loopback for the internal stages (which take
    unauthenticated work: exposing them is a decision, e.g. the Helm chart's pod address)."""
    return host or (PUBLIC_HOST if public else INTERNAL_HOST)


def add_common_flags(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    add_flag(
        parser, "--host", "IMAGEGEN_HOST", None, "bind address; unset: 127.0.0.1 (beyond it needs credentials)"
    )
    add_flag(parser, "--port", "IMAGEGEN_PORT", port, "gRPC port", type=non_negative_int)
    add_flag(
        parser,
        "--metrics-port",
        "IMAGEGEN_METRICS_PORT",
        metrics_port,
        "Prometheus /metrics port; 0 disables",
        type=non_negative_int,
    )
    add_flag(
        parser,
        "--health-port",
        "IMAGEGEN_HEALTH_PORT",
        0,
        "plaintext port serving only grpc.health.v1.Health (kubelet probes when TLS is on); 0 disables",
        type=non_negative_int,
    )
    add_flag(
        parser,
        "--log-level",
        "IMAGEGEN_LOG_LEVEL",
        "info",
        "debug, info, warning or error",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
    )
    add_flag(
        parser,
        "--drain-timeout",
        "IMAGEGEN_DRAIN_TIMEOUT",
        DRAIN_TIMEOUT_S,
        "seconds SIGTERM lets the requests in flight and in the queue finish (each within its own deadline) "
        "before cutting off what is left; size it to the deepest queue",
        type=non_negative_float,
    )
    add_flag(parser, "--tls-cert", "IMAGEGEN_TLS_CERT", None, "PEM certificate: serve TLS (with --tls-key)")
    add_flag(parser, "--tls-key", "IMAGEGEN_TLS_KEY", None, "PEM private key of --tls-cert")
    add_flag(
        parser,
        "--tls-ca",
        "IMAGEGEN_TLS_CA",
        None,
        "PEM CA: internal services require client certificates signed by it; clients of internal services "
        "present --tls-cert/--tls-key and verify peers with it",
    )
    add_flag(
        parser,
        "--default-timeout",
        "IMAGEGEN_DEFAULT_TIMEOUT",
        600.0,
        "seconds a request may take when its caller set no deadline",
        type=positive_float,
    )
    add_limit_flags(parser)
    add_flag(
        parser,
        "--cache-dir",
        "IMAGEGEN_CACHE",
        DEFAULT_CACHE_ROOT,
        "compiler caches and compile markers (inductor's under CACHE/inductor unless TORCHINDUCTOR_CACHE_DIR is set)",
    )
    add_flag(
        parser,
        "--torch-threads",
        "IMAGEGEN_TORCH_THREADS",
        0,
        "torch intra-op threads (pin it for bit-reproducible CPU results); 0 keeps torch's default",
        type=non_negative_int,
    )


# (flag, env, Limits field, help): each default is the `Limits` field's, written once there.
LIMIT_FLAGS = (
    ("--max-side", "IMAGEGEN_MAX_SIDE", "max_side", "largest width or height"),
    ("--max-steps", "IMAGEGEN_MAX_STEPS", "max_steps", "most denoising steps"),
    ("--max-images", "IMAGEGEN_MAX_IMAGES", "max_images_per_request", "most input and output images per request"),
    ("--max-request-pixels", "IMAGEGEN_MAX_REQUEST_PIXELS", "max_request_pixels", "most num_images x width x height"),
    ("--max-response-bytes", "IMAGEGEN_MAX_RESPONSE_BYTES", "max_response_bytes", "largest response (estimated)"),
    ("--max-prompt-chars", "IMAGEGEN_MAX_PROMPT_CHARS", "max_prompt_chars", "longest prompt or negative prompt"),
    ("--max-input-bytes", "IMAGEGEN_MAX_INPUT_BYTES", "max_input_bytes", "largest input image file"),
    ("--max-input-pixels", "IMAGEGEN_MAX_INPUT_PIXELS", "max_input_pixels", "most pixels of a decoded input image"),
)
MAX_MESSAGE_BYTES = 512 << 20


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Request limits: the gateway checks public requests against them, the stages their internal ones."""
    defaults = Limits()
    for flag, env, field, help in LIMIT_FLAGS:
        add_flag(parser, flag, env, getattr(defaults, field), help, type=positive_int)
    add_flag(
        parser,
        "--max-message-bytes",
        "IMAGEGEN_MAX_MESSAGE_BYTES",
        MAX_MESSAGE_BYTES,
        "largest internal gRPC message",
        type=positive_int,
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The --max-* flags every service has."""
    return Limits(**{field: getattr(args, flag[2:].replace("-", "_")) for flag, _, field, _ in LIMIT_FLAGS})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--model", "IMAGEGEN_MODEL", None, "diffusers-format model folder (required)")
    add_flag(parser, "--model-id", "IMAGEGEN_MODEL_ID", None, "the name requests use; default the folder's name")
    add_flag(parser, "--device", "IMAGEGEN_DEVICE", "cpu", "cpu or cuda")
    add_flag(parser, "--dtype", "IMAGEGEN_DTYPE", None, "float32 or bfloat16; default float32 on cpu, bfloat16 on cuda")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser, "--redis-url", "IMAGEGEN_REDIS_URL", None, "embeddings cache, e.g. redis://redis:6379/0; unset: LRU"
    )
    add_flag(
        parser, "--cache-ttl", "IMAGEGEN_CACHE_TTL", 86400, "seconds an embedding stays in Redis", type=positive_int
    )
    add_flag(
        parser, "--cache-bytes", "IMAGEGEN_CACHE_BYTES", 1 << 30, "in-process LRU bound in bytes", type=non_negative_int
    )
    add_flag(
        parser,
        "--redis-timeout",
        "IMAGEGEN_REDIS_TIMEOUT",
        0.25,
        "seconds a Redis command may take before the tensor is passed inline instead",
        type=float,
    )


def redis_password() -> str | None:
    """From a Secret, never a flag (flags show up in process listings)."""
    return os.environ.get("IMAGEGEN_REDIS_PASSWORD") or None
