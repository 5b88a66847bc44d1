"""gRPC outcomes as OpenAI-style HTTP errors: `{"error": {"message", "type", "param", "code"}}` with the status
the openai client maps to its exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError), and `HttpContext`, the HTTP request as the servicer sees a call."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import grpc
from imagegen_client.status import RESPONSE_TOO_LARGE, ErrorDetails, parse_error
from starlette.responses import JSONResponse

from imagegen.services.http_params import PARAM_OF_FIELD

# gRPC code -> (HTTP status, OpenAI error type, default error code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "out_of_range"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "unimplemented"),
    # CANCELLED here was answered by a backend that dropped the call (our own caller's never gets an answer).
    grpc.StatusCode.CANCELLED: (503, "server_error", "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}
_INTERNAL = (500, "server_error", "internal_error")
_RETRY_LATER = {429, 503}  # answered with Retry-After


class HttpAbort(Exception):
    """The servicer's `context.abort` on the HTTP path; reads like a `grpc.RpcError` (code, details, trailers)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str | bytes]]) -> None:
        super().__init__(f"{code.name}: {message}")
        self._code, self._message, self._trailing = code, message, tuple(trailing or ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing


class HttpContext:
    """What the ImageService servicer reads from a gRPC context, taken from an HTTP request, so that both
    protocols run the same handler code (auth, validation, deadline, metrics, access log)."""

    def __init__(self, authorization: str | None, timeout: float | None) -> None:
        self._metadata = (("authorization", authorization),) if authorization is not None else ()
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:
        raise HttpAbort(code, details, trailing_metadata)


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def status_of(info: ErrorDetails) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) for a failed ImageService call."""
    status, kind, code = _STATUS.get(info.code, _INTERNAL)
    field = info.field_violations[0][0] if info.field_violations else None
    param = PARAM_OF_FIELD.get(field.split("[", 1)[0], field) if field else None  # images[0] -> image
    if info.reason is not None:
        code = info.reason.lower()  # e.g. "queue_full", "retries_exhausted"
    if field == "model" and "unknown model" in info.message:
        status, code = 404, "model_not_found"
    elif info.reason == RESPONSE_TOO_LARGE:
        status, kind = 400, "invalid_request_error"  # no retry helps: the request asks for too much
    headers = {}
    if status in _RETRY_LATER:
        # The gateway already retried a full queue within the deadline; a client should wait before the next try.
        delay = info.retry_delay if info.retry_delay is not None else 1.0
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    return status, error_body(info.message, kind, code, param), headers


def failure_response(error: HttpAbort) -> JSONResponse:
    status, body, headers = status_of(parse_error(error))
    return JSONResponse(body, status_code=status, headers=headers)


def plain_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error the HTTP layer answers itself (unknown path, body too large, malformed body)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = code or {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, "invalid_value")
    return JSONResponse(error_body(message, kind, code, param), status_code=status)
