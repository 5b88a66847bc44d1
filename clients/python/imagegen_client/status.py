"""Reading a failed call's status back: code, message and the `google.rpc` details (field violations, reason,
retry delay) the services attach. The server builds statuses in `imagegen.common.serving.status`."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "imagegen.v1"
DETAILS_KEY = "grpc-status-details-bin"
# ErrorInfo reasons the services and the SDK act on.
EMBEDDINGS_MISSING = "EMBEDDINGS_MISSING"
QUEUE_FULL = "QUEUE_FULL"
RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"  # the gateway already retried this request's stage calls: do not again
GROUP_FAILED = "GROUP_FAILED"  # a denoiser process group broke; the replica is restarting
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"  # the images asked for exceed the response-size limit


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
