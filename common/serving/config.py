"""Flags that also read environment variables (flags win), with the defaults docs/services.md documents."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from common.errors import ImagegenError


class ConfigError(ImagegenError):
    """A service cannot start with these flags."""


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


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_common_flags(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    add_flag(parser, "--host", "IMAGEGEN_HOST", "0.0.0.0", "bind address")
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
        "--grace-period",
        "IMAGEGEN_GRACE_PERIOD",
        30.0,
        "seconds to drain in-flight work on SIGTERM",
        type=float,
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
        "--torch-threads",
        "IMAGEGEN_TORCH_THREADS",
        0,
        "torch intra-op threads (pin it for bit-reproducible CPU results); 0 keeps torch's default",
        type=non_negative_int,
    )


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
