"""Malformed request messages are the caller's INVALID_ARGUMENT, not UNKNOWN "Unexpected <class ...DecodeError>".

A server interceptor wraps each unary-request handler's deserializer: bytes that do not parse (bad UTF-8 in a
string field, a truncated field) become a marker, and the handler answers INVALID_ARGUMENT for it without
running. Handlers whose request is streamed (the auth refusals) are left as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    pass


MALFORMED = _Malformed()
MESSAGE = "the request message is malformed (not a valid protobuf of this method's request type)"


def _safe(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserializer(data) if deserializer is not None else data
        except (DecodeError, UnicodeDecodeError, ValueError):
            return MALFORMED

    return parse


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = _safe(handler.request_deserializer)
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request, context):
            if request is MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, deserialize, handler.response_serializer)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def stream(request, context):
            if request is MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)
            async for item in streaming(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, deserialize, handler.response_serializer)
    return handler


class MalformedRequests(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        return _guarded(handler)
