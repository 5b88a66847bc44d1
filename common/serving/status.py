"""gRPC statuses with `google.rpc` details: built by services, read back by the gateway and the SDK.

`RpcFailure` is the one exception a handler raises to answer a specific status; the handler wrappers turn it
(and `InvalidArgument`, `Cancelled`, ...) into the wire status. `parse_error` reads any `grpc.RpcError` back into
code, message, field violations, reason and retry delay (`imagegen_client.status`, shared with the SDK).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# Reading statuses back is the SDK's job too: one copy, in the client distribution.
from imagegen_client.status import (  # noqa: F401 (re-exported)
    DETAILS_KEY,
    DOMAIN,
    EMBEDDINGS_MISSING,
    GROUP_FAILED,
    QUEUE_FULL,
    RESPONSE_TOO_LARGE,
    RETRIES_EXHAUSTED,
    ErrorDetails,
    parse_error,
)


class RpcFailure(Exception):
    """Answer the current RPC with `code`, `message` and `google.rpc` detail messages."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = list(details)

    def to_status(self) -> grpc.Status:
        packed = []
        for detail in self.details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message, details=packed))


def invalid_argument(field_name: str, message: str) -> RpcFailure:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field_name, description=message)
    return RpcFailure(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field_name}: {message}",
        [error_details_pb2.BadRequest(field_violations=[violation])],
    )


def with_reason(code: grpc.StatusCode, reason: str, message: str, retry_after: float | None = None) -> RpcFailure:
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return RpcFailure(code, message, details)


def relay(error: grpc.RpcError, prefix: str = "") -> RpcFailure:
    """A backend's failure re-raised to our caller with the same code and details."""
    info = parse_error(error)
    return RpcFailure(info.code, f"{prefix}{info.message}", info.raw)
