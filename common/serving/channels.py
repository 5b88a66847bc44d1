"""Client side of internal calls: channels (mTLS when configured), deadlines, and retries on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from common.serving import metrics
from common.serving.status import RpcFailure
from common.serving.tls import TlsConfig

T = TypeVar("T")
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Reconnect quickly after a backend restarts: gRPC's default backoff (1 s growing to 120 s) would fail every
    # retry below while the channel waits to reconnect.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A headless Service resolves to every ready replica: spread calls over all of them, not just the first.
    ("grpc.lb_policy_name", "round_robin"),
]


def internal_channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    credentials = tls.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class Deadline:
    """The caller's deadline, handed down to every internal call as its timeout."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (attempt 0 -> up to `initial_backoff`)."""
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2**attempt))

    def should_retry(self, error: grpc.RpcError, attempt: int, deadline: Deadline) -> float | None:
        """The delay before the next attempt, or None when the error is final."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 >= self.attempts:
            return None
        delay = self.delay(attempt)
        remaining = deadline.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay


async def call_with_retries(
    call: Callable[..., Awaitable[T]], request: Any, backend: str, deadline: Deadline, policy: RetryPolicy
) -> T:
    """A unary call (idempotent: our stage calls are pure functions of the request), retried on UNAVAILABLE."""
    attempt = 0
    while True:
        try:
            return await call(request, timeout=deadline.remaining())
        except grpc.aio.AioRpcError as error:
            delay = policy.should_retry(error, attempt, deadline)
            if delay is None:
                raise
            metrics.BACKEND_RETRIES.labels(backend).inc()
            await asyncio.sleep(delay)
            attempt += 1
