"""The gateway's side of the one retry policy (`imagegen_client.retry`, shared with the SDK): a deadline that
answers DEADLINE_EXCEEDED once past, and a budget that relays a backend's final failure so that nobody upstream
retries what this request already retried."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from imagegen_client import retry as shared
from imagegen_client.retry import DEFAULT_TIMEOUT_S

from imagegen.common.serving.status import DOMAIN, RETRIES_EXHAUSTED, RpcFailure, parse_error

__all__ = ["DEFAULT_TIMEOUT_S", "Deadline", "RetryBudget", "RetryPolicy"]


# An internal call's deadline ends this much before ours (half of what is left when less than twice this is), so
# the stage's own deadline passes first: the stage stops the work and records it as a deadline, and we hear its
# DEADLINE_EXCEEDED, instead of our cancellation racing its deadline over the wire.
HANDOFF_MARGIN_S = 0.05


class Deadline(shared.Deadline):
    """The time by which a request must be answered, handed down to every internal call as its timeout."""

    def remaining(self) -> float | None:
        """Seconds the next internal call may take (`HANDOFF_MARGIN_S` less than is left); raises
        DEADLINE_EXCEEDED once past."""
        left = self.left()
        if left is None:
            return None
        if left <= 0:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left - HANDOFF_MARGIN_S if left > 2 * HANDOFF_MARGIN_S else left / 2


class RetryPolicy(shared.RetryPolicy):
    def budget(self, deadline: shared.Deadline) -> RetryBudget:
        return RetryBudget(self, deadline)


class RetryBudget(shared.RetryBudget):
    def failure(self, error: grpc.RpcError, prefix: str = "") -> RpcFailure:
        """A backend's final failure for our caller: same code, message and details, except that a retryable
        one loses its retry hint and an UNAVAILABLE one is marked RETRIES_EXHAUSTED, so that nobody upstream
        retries what this request already retried."""
        info = parse_error(error)
        if not self.policy.retryable(info):
            return RpcFailure(info.code, f"{prefix}{info.message}", info.raw)
        drop = error_details_pb2.RetryInfo
        if info.code in shared.DROPPED:
            drop = error_details_pb2.RetryInfo | error_details_pb2.ErrorInfo
        keep = [d for d in info.raw if not isinstance(d, drop)]
        if info.code in shared.DROPPED:
            keep.append(error_details_pb2.ErrorInfo(reason=RETRIES_EXHAUSTED, domain=DOMAIN))
        return RpcFailure(info.code, f"{prefix}{info.message}", keep)
