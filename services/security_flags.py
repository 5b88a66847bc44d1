"""The flags of exposure, credentials and admission (docs/services.md, "Security"), kept apart from
`services.flags` so the two change independently. `add_security_flags` runs after each service's own flags."""

from __future__ import annotations

import argparse

from imagegen.common.serving.config import (
    add_flag,
    add_switch,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from imagegen.common.serving.keys import MIN_KEY_LENGTH

MAX_TIMEOUT_S = 900.0  # the longest deadline a caller may ask for; longer ones are cut to this
MAX_REQUEST_WORK = 1000  # megapixel-steps: e.g. 4 images of 1024^2 with 50 steps and CFG are 400
MAX_DECODED_BYTES = 256 << 20  # decoded input pixels (RGBA bytes) of one request, all images together


def exposure_flags(parser: argparse.ArgumentParser) -> None:
    """Every service: where metrics listen, the internal token, and the opt-in to listening unauthenticated."""
    add_flag(
        parser,
        "--metrics-host",
        "IMAGEGEN_METRICS_HOST",
        "127.0.0.1",
        "bind address of /metrics (the chart sets the pod address)",
    )
    add_flag(
        parser,
        "--internal-token-file",
        "IMAGEGEN_INTERNAL_TOKEN_FILE",
        None,
        "file holding the shared secret of the internal hop (at least 16 characters): stages require it from "
        "callers, the gateway sends it; unset: `serve all` makes a random one, other services use none",
    )
    add_switch(
        parser,
        "--allow-unauthenticated",
        "IMAGEGEN_ALLOW_UNAUTHENTICATED",
        "listen beyond loopback without credentials (no --api-keys-file on the gateway, no internal token on a "
        "stage); logged as a warning. Without it such a start is refused",
    )


def gateway_security_flags(parser: argparse.ArgumentParser) -> None:
    """The gateway's admission: key rules, deadlines, the cost model, per-key quotas and connection bounds."""
    flags = (
        ("--min-key-length", "IMAGEGEN_MIN_KEY_LENGTH", MIN_KEY_LENGTH, "shortest plaintext API key accepted", int),
        (
            "--max-timeout",
            "IMAGEGEN_MAX_TIMEOUT",
            MAX_TIMEOUT_S,
            "longest deadline a caller may ask for, in seconds (longer ones are cut to it)",
            positive_float,
        ),
        (
            "--max-request-work",
            "IMAGEGEN_MAX_REQUEST_WORK",
            MAX_REQUEST_WORK,
            "most work of one request: images x width x height x steps x CFG branches / 2^20; 0: no limit",
            non_negative_float,
        ),
        (
            "--key-max-in-flight",
            "IMAGEGEN_KEY_MAX_IN_FLIGHT",
            16,
            "requests one API key may have in flight; more answer 429 / RESOURCE_EXHAUSTED; 0: no limit",
            non_negative_int,
        ),
        (
            "--key-work-per-minute",
            "IMAGEGEN_KEY_WORK_PER_MINUTE",
            0.0,
            "work (as --max-request-work counts it) one API key may start per minute; 0: no limit",
            non_negative_float,
        ),
        (
            "--max-active-requests",
            "IMAGEGEN_MAX_ACTIVE_REQUESTS",
            32,
            "requests running through the stages at once; more wait, served round robin across keys; 0: no limit",
            non_negative_int,
        ),
        (
            "--max-concurrent-rpcs",
            "IMAGEGEN_MAX_CONCURRENT_RPCS",
            256,
            "gRPC calls in flight on the public port; more answer RESOURCE_EXHAUSTED at once",
            positive_int,
        ),
        (
            "--max-decoded-bytes",
            "IMAGEGEN_MAX_DECODED_BYTES",
            MAX_DECODED_BYTES,
            "decoded size (width x height x 4) of one request's input images together, checked before decoding",
            positive_int,
        ),
        (
            "--http-max-connections",
            "IMAGEGEN_HTTP_MAX_CONNECTIONS",
            512,
            "open HTTP connections; beyond it the oldest one still sending its headers is closed",
            positive_int,
        ),
        (
            "--http-max-in-flight",
            "IMAGEGEN_HTTP_MAX_IN_FLIGHT",
            128,
            "HTTP requests in flight; more answer 503 with Retry-After",
            positive_int,
        ),
        (
            "--http-header-timeout",
            "IMAGEGEN_HTTP_HEADER_TIMEOUT",
            10.0,
            "seconds a connection may take to send a request's headers",
            positive_float,
        ),
        (
            "--http-body-timeout",
            "IMAGEGEN_HTTP_BODY_TIMEOUT",
            30.0,
            "seconds a request body may pause between chunks (then 408)",
            positive_float,
        ),
        (
            "--http-keep-alive",
            "IMAGEGEN_HTTP_KEEP_ALIVE",
            5,
            "seconds an idle keep-alive connection stays open",
            positive_int,
        ),
    )
    for flag, env, default, help, kind in flags:
        add_flag(parser, flag, env, default, help, type=kind)
    add_flag(
        parser,
        "--allowed-origins",
        "IMAGEGEN_ALLOWED_ORIGINS",
        "",
        "comma-separated browser Origins the HTTP API accepts (* for any); requests with another Origin get 403",
    )


def add_security_flags(parser: argparse.ArgumentParser, service: str) -> None:
    exposure_flags(parser)
    if service in ("gateway", "all"):
        gateway_security_flags(parser)
