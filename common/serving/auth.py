"""Who may call: API keys on the public port, a shared internal token on the stages, both checked from the
call's metadata by a server interceptor, before the request message is read.

A refused call is answered UNAUTHENTICATED by a request-streaming handler that never reads its request, so an
unauthenticated caller's (possibly huge) message is not received, let alone parsed. Health checks pass without
credentials (kubelet probes have none), and so does reflection (it describes the public protos, nothing else).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc

from imagegen.common.serving.keys import ApiKeys
from imagegen.common.serving.status import RpcFailure

__all__ = ["ApiKeys", "InternalToken", "KeyInterceptor", "TokenInterceptor", "UNAUTHENTICATED_METHODS"]
log = logging.getLogger("imagegen.auth")
INTERNAL_HEADER = "x-imagegen-internal-token"
# Health (kubelet probes carry no credentials) and reflection (the schema is public: it ships in the client).
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class InternalToken:
    """The shared secret of the internal hop (gateway -> stages): sent as metadata, compared in constant time."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the internal token must be at least 16 characters")
        self.token = token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_HEADER, self.token),)

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        given = next((value for key, value in metadata or () if key == INTERNAL_HEADER), None)
        if given is None:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "this internal port needs the internal token")
        if isinstance(given, str):
            given = given.encode(errors="replace")
        if not hmac.compare_digest(given, self.token.encode()):
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "wrong internal token")


def _refusal(handler: grpc.RpcMethodHandler, failure: RpcFailure) -> grpc.RpcMethodHandler:
    """A handler answering `failure` without reading the request (request-streaming: nothing is received)."""

    async def unary(_requests, context):
        await context.abort(failure.code, failure.message)

    async def streaming(_requests, context):
        await context.abort(failure.code, failure.message)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.stream_unary_rpc_method_handler(unary)


class _CheckingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, check: Callable[[Iterable[tuple[str, str | bytes]] | None], object]) -> None:
        self._check = check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        try:
            self._check(handler_call_details.invocation_metadata)
        except RpcFailure as failure:
            return _refusal(handler, failure)
        return handler


class KeyInterceptor(_CheckingInterceptor):
    """API keys on the public gRPC port (the servicer checks again to learn the key id for its quotas)."""

    def __init__(self, keys: ApiKeys) -> None:
        super().__init__(keys.check)


class TokenInterceptor(_CheckingInterceptor):
    """The internal token on a stage's port."""

    def __init__(self, token: InternalToken) -> None:
        super().__init__(token.check)
