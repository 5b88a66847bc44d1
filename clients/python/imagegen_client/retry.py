"""The one retry policy: what is retried, how long for, and one budget per request.

The gateway owns retries of the stages: each internal call waits for its stage to be ready, and a retryable
failure is tried again, all within the request's deadline and one attempt budget shared by every call the
request makes. When the gateway gives up it says so (ErrorInfo reason RETRIES_EXHAUSTED) and the SDK does not
retry that; the SDK retries only what never reached a working gateway (a gateway restarting or draining). So an
outage costs at most one budget per request, never SDK attempts x gateway attempts.

The SDK and the gateway share this module; the gateway's additions (answering DEADLINE_EXCEEDED, relaying a
final failure) are in `imagegen.common.serving.retry`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from imagegen_client.status import RETRIES_EXHAUSTED, ErrorDetails, parse_error

DROPPED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # the call did not get an answer from its work
# A request without a deadline gets this one (gateway and stages), so that nothing waits forever.
DEFAULT_TIMEOUT_S = 600.0


class Deadline:
    """The time by which a request must be answered."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    @classmethod
    def within(cls, seconds: float | None, default: float | None) -> Deadline:
        """The caller's deadline, or `default` seconds when the caller set none."""
        return cls(seconds if seconds is not None else default)

    def left(self) -> float | None:
        """Seconds left (0 once past), or None for no deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` counts every try of every call of one request together (1: never retry). A full queue is
    retried at most `busy_retries` times per request (on another replica, or after its retry hint): enough to
    ride a burst, few enough that the gateway does not become an unbounded waiting room in front of the queue."""

    attempts: int = 64
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    busy_retries: int = 2

    def retryable(self, info: ErrorDetails) -> bool:
        """UNAVAILABLE (a stage restarting, draining or unreachable), CANCELLED as an answer (the other side
        dropped the call: our own cancellation raises `asyncio.CancelledError`, never reaches here) and
        RESOURCE_EXHAUSTED with a retry hint (a full queue), unless whoever answered has already spent the
        request's retries."""
        if info.reason == RETRIES_EXHAUSTED:
            return False
        if info.code in DROPPED:
            return True
        return info.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.retry_delay is not None

    def backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter (retry 0 -> up to `initial_backoff`)."""
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** min(retry, 32)))

    def budget(self, deadline: Deadline) -> RetryBudget:
        return RetryBudget(self, deadline)


class RetryBudget:
    """One request's retries: every call it makes draws on the same attempts and the same deadline."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline) -> None:
        self.policy = policy
        self.deadline = deadline
        self.retries = 0
        self.busy = 0

    def delay(self, error: grpc.RpcError | ErrorDetails) -> float | None:
        """Seconds to wait before trying again (the retry is counted), or None when `error` is final."""
        info = error if isinstance(error, ErrorDetails) else parse_error(error)
        if not self.policy.retryable(info) or self.retries + 1 >= self.policy.attempts:
            return None
        busy = info.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        if busy and self.busy >= self.policy.busy_retries:
            return None
        delay = max(self.policy.backoff(self.retries), info.retry_delay or 0.0)
        left = self.deadline.left()
        if left is not None and delay >= left:
            return None
        self.retries += 1
        self.busy += busy
        return delay
