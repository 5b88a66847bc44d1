"""gRPC statuses with `google.rpc` details: built by services, read back by the gateway and the SDK.

`RpcFailure` is the one exception a handler raises to answer a specific status; the handler wrappers turn it
(and `InvalidArgument`, `Cancelled`, ...) into the wire status. `parse_error` reads any `grpc.RpcError` back into
code, message, field violations, reason and retry delay. No torch here: the SDK imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "imagegen.v1"
DETAILS_KEY = "grpc-status-details-bin"
# ErrorInfo reasons the services and the SDK act on.
EMBEDDINGS_MISSING = "EMBEDDINGS_MISSING"
QUEUE_FULL = "QUEUE_FULL"
RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"  # the gateway already retried this request's stage calls: do not again
GROUP_FAILED = "GROUP_FAILED"  # a denoiser process group broke; the replica is restarting
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"  # the images asked for exceed the response-size limit


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


@dataclass
class ErrorDetails:
    """What a client can act on in a failed call."""

    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None
    retry_delay: float | None = None
    raw: list[Message] = field(default_factory=list)


def parse_error(error: grpc.RpcError) -> ErrorDetails:
    """Code, message and details of a sync or asyncio `RpcError` (details from the trailing metadata)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    info = ErrorDetails(code or grpc.StatusCode.UNKNOWN, message or "")
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key != DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            continue
        for holder in status.details:
            _read_detail(holder, info)
    return info


def _read_detail(holder: any_pb2.Any, info: ErrorDetails) -> None:
    for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
        if holder.Is(cls.DESCRIPTOR):
            detail = cls()
            holder.Unpack(detail)
            info.raw.append(detail)
            if isinstance(detail, error_details_pb2.BadRequest):
                info.field_violations += [(v.field, v.description) for v in detail.field_violations]
            elif isinstance(detail, error_details_pb2.ErrorInfo):
                info.reason = detail.reason
            else:
                info.retry_delay = detail.retry_delay.ToNanoseconds() / 1e9
            return


def relay(error: grpc.RpcError, prefix: str = "") -> RpcFailure:
    """A backend's failure re-raised to our caller with the same code and details."""
    info = parse_error(error)
    return RpcFailure(info.code, f"{prefix}{info.message}", info.raw)
