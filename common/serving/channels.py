"""Client side of internal calls: channels (mTLS when configured) and calls that ride through a stage restart.

Every internal call waits for a ready backend (`wait_for_ready`: a restarting or draining stage is waited for,
not failed at once) within the request's deadline, and retries what the request's `RetryBudget` allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from imagegen_client.transport import DEFAULT_MESSAGE_LIMIT, client_options

from imagegen.common.serving import metrics
from imagegen.common.serving.auth import InternalToken
from imagegen.common.serving.retry import RetryBudget
from imagegen.common.serving.tls import TlsConfig

T = TypeVar("T")


def _with(metadata: tuple[tuple[str, str], ...], details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *metadata))  # type: ignore


# grpc.aio files an interceptor under one kind only: one class per kind.
class _UnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with(self._metadata, client_call_details), request)


class _StreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with(self._metadata, client_call_details), request)


def internal_channel(address: str, tls: TlsConfig, max_receive_bytes: int = DEFAULT_MESSAGE_LIMIT) -> grpc.aio.Channel:
    options = client_options(max_receive_bytes, internal=True)
    credentials = tls.channel_credentials()
    interceptors = None
    if tls.internal_token:  # the stages require it (`auth.TokenInterceptor`)
        metadata = InternalToken(tls.internal_token).metadata()
        interceptors = [_UnaryToken(metadata), _StreamToken(metadata)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


async def call_with_retries(call: Callable[..., Awaitable[T]], request: Any, backend: str, budget: RetryBudget) -> T:
    """A unary call (idempotent: our stage calls are pure functions of the request), waiting for a ready backend
    and retried while `budget` allows. Raises the last `AioRpcError`."""
    while True:
        try:
            return await call(request, timeout=budget.deadline.remaining(), wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            delay = budget.delay(error)
            if delay is None:
                raise
            metrics.BACKEND_RETRIES.labels(backend).inc()
            await asyncio.sleep(delay)
