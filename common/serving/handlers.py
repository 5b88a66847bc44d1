"""The wrapper every servicer method goes through: request id, access log, metrics, exceptions -> statuses.

A handler raises; this module answers. `InvalidArgument` becomes INVALID_ARGUMENT with a BadRequest field
violation, `Cancelled` DEADLINE_EXCEEDED or CANCELLED, `QueueFull` RESOURCE_EXHAUSTED with RetryInfo,
`ResponseTooLarge` and out-of-memory RESOURCE_EXHAUSTED, a backend's `RpcError` its own status, and anything else
INTERNAL (logged with its traceback) -- the process and the other requests carry on.

`Caller` lets work queued on a compute thread see that its RPC has ended (cancelled, past its deadline, or
answered), so that nobody computes for a caller who left.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from imagegen.common.errors import Cancelled, InvalidArgument
from imagegen.common.serving import metrics
from imagegen.common.serving.echo import LOG_ERROR_CHARS, clip
from imagegen.common.serving.logs import request_id_var
from imagegen.common.serving.status import (
    QUEUE_FULL,
    RESPONSE_TOO_LARGE,
    RpcFailure,
    invalid_argument,
    relay,
    with_reason,
)
from imagegen.common.validation import ResponseTooLarge

log = logging.getLogger("imagegen.rpc")
T = TypeVar("T")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
QUEUE_RETRY_AFTER = 1.0


class QueueFull(Exception):
    """The bounded queue has no room; the caller may retry later."""


def _failure(exc: BaseException, context: grpc.aio.ServicerContext) -> RpcFailure:
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, InvalidArgument):
        return invalid_argument(exc.field, exc.message)
    if isinstance(exc, Cancelled):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}")
        return RpcFailure(grpc.StatusCode.CANCELLED, str(exc))
    if isinstance(exc, QueueFull):
        return with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL, str(exc), QUEUE_RETRY_AFTER)
    if isinstance(exc, ResponseTooLarge):
        return with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, RESPONSE_TOO_LARGE, str(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        log.warning("out of memory", exc_info=exc)  # the allocator's details are for the log, not the caller
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory (request id {request_id_var.get()})")
    if isinstance(exc, grpc.RpcError):
        return relay(exc)
    log.error("unhandled error", exc_info=exc)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")


class _Rpc:
    """The lifetime of one RPC: sets the request id, then records and answers its outcome."""

    def __init__(self, service: str, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method, self.request, self.context = service, method, request, context

    async def __aenter__(self) -> _Rpc:
        given = getattr(self.request, "request_id", "") or ""
        valid = bool(_REQUEST_ID.fullmatch(given))
        self.bad_request_id = bool(given) and not valid
        # Each RPC runs in its own task, whose context copy this sets; nothing to reset afterwards.
        request_id_var.set(given if valid else uuid.uuid4().hex)
        self.start = time.perf_counter()
        return self

    def check(self) -> None:
        if self.bad_request_id:
            raise invalid_argument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : / + = -")

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        failure = None
        if exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The client went away or the deadline passed (a closed stream sees GeneratorExit): nothing to answer.
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError):
            code = self.context.code() or grpc.StatusCode.UNKNOWN
        elif isinstance(exc, Exception):
            failure = _failure(exc, self.context)
            code = failure.code
        else:
            code = grpc.StatusCode.UNKNOWN  # KeyboardInterrupt, SystemExit: not ours to turn into a status
        elapsed = time.perf_counter() - self.start
        metrics.REQUESTS.labels(self.service, self.method, code.name).inc()
        metrics.REQUEST_SECONDS.labels(self.service, self.method).observe(elapsed)
        fields = {"method": self.method, "code": code.name, "duration_ms": round(elapsed * 1000, 2)}
        if failure is not None and code != grpc.StatusCode.OK:
            fields["error"] = clip(failure.message, LOG_ERROR_CHARS)  # messages echo callers' strings
        log.info("rpc", extra=fields)
        if failure is not None:
            await self.context.abort(failure.code, failure.message, failure.to_status().trailing_metadata)
        return False


def rpc(service: str) -> Callable:
    """Decorate an async servicer method (unary, or an async generator for server streaming)."""

    def decorate(method: Callable) -> Callable:
        name = method.__name__
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(self, request, context):
                async with _Rpc(service, name, request, context) as call:
                    call.check()
                    async for item in method(self, request, context):
                        yield item

            return streaming

        @functools.wraps(method)
        async def unary(self, request, context):
            async with _Rpc(service, name, request, context) as call:
                call.check()
                return await method(self, request, context)

        return unary

    return decorate


def current_request_id() -> str:
    return request_id_var.get() or ""


class Caller:
    """Whether the RPC that asked for some work still wants it (readable from any thread)."""

    def __init__(self, context: grpc.aio.ServicerContext, default_timeout: float) -> None:
        remaining = context.time_remaining()
        self.deadline = time.monotonic() + (default_timeout if remaining is None else remaining)
        self._ended = threading.Event()
        context.add_done_callback(lambda _context: self._ended.set())

    def gone(self) -> bool:
        return self._ended.is_set() or time.monotonic() >= self.deadline


async def in_executor(
    executor: Executor, fn: Callable[..., T], *args: Any, unwanted: Callable[[], bool] | None = None
) -> T:
    """Run blocking work on `executor`, keeping the request id for its log lines; work that is `unwanted()`
    (its caller has gone, e.g. `Caller.gone`) by the time a thread takes it is dropped (`Cancelled`)."""
    context = contextvars.copy_context()

    def run() -> T:
        if unwanted is not None and unwanted():
            raise Cancelled("the caller left before the work started")
        return context.run(fn, *args)

    return await asyncio.get_running_loop().run_in_executor(executor, run)


def require_ready(ready: bool, what: str) -> None:
    if not ready:
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{what} is still starting")
