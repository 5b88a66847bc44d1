"""The HTTP API's front door, an ASGI middleware that decides on the headers alone, before any body is read:

1. Origin: a browser request (it carries `Origin`) from an origin not in --allowed-origins is 403, so a web page
   cannot make a visitor's browser post to a local server (CSRF, DNS rebinding).
2. API key: `Authorization: Bearer KEY` checked against the key file; 401 otherwise. No body byte is received
   for an unauthenticated request, whatever its size.
3. Requests in flight: beyond --http-max-in-flight, 503 with Retry-After.
4. Body size per route: a declared Content-Length over the route's limit is 413 at once; a streamed body is
   counted as it arrives and stopped at the limit (413). Generations take 1 MiB, edits their images' worth.
5. Body pace: a body that stalls longer than --http-body-timeout between chunks is 408 (a slow-body attack holds
   a slot for at most that long per chunk).
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field

import grpc
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen.common.serving.keys import ApiKeys
from imagegen.common.serving.status import RpcFailure

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
OTHER_BODY_BYTES = 64 << 10  # any other route (GETs) needs no body
GENERATION_BODY_BYTES = 1 << 20  # a JSON generation body: two 8192-char prompts and the options fit many times


@dataclass(frozen=True)
class AdmissionConfig:
    keys: ApiKeys | None = None
    route_bytes: dict[str, int] = field(default_factory=dict)  # path -> body limit
    other_bytes: int = OTHER_BODY_BYTES
    max_in_flight: int = 128
    body_timeout: float = 30.0
    allowed_origins: frozenset[str] = frozenset()
    file_part_bytes: int = 32 << 20  # one image part of the edit form

    @classmethod
    def from_args(cls, args: argparse.Namespace, keys: ApiKeys | None) -> AdmissionConfig:
        edits = min(args.max_images * args.max_input_bytes + (1 << 20), 2**31 - 1)
        origins = frozenset(o.strip().rstrip("/") for o in (args.allowed_origins or "").split(",") if o.strip())
        return cls(
            keys=keys,
            route_bytes={GENERATIONS: GENERATION_BODY_BYTES, EDITS: edits},
            max_in_flight=args.http_max_in_flight,
            body_timeout=args.http_body_timeout,
            allowed_origins=origins,
            file_part_bytes=args.max_input_bytes,
        )

    def body_limit(self, path: str) -> int:
        return self.route_bytes.get(path.rstrip("/"), self.other_bytes)


def _error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Admission:
    def __init__(self, app: ASGIApp, config: AdmissionConfig) -> None:
        self.app, self.config = app, config
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, self._paced(scope, receive), send)
        finally:
            self.in_flight -= 1

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        config = self.config
        origin = headers.get("origin")
        allowed = config.allowed_origins
        if origin is not None and "*" not in allowed and origin.rstrip("/") not in allowed:
            return _error(403, "this origin is not allowed (--allowed-origins)", "permission_error", "origin_refused")
        if config.keys is not None:
            try:
                config.keys.check([("authorization", headers["authorization"])] if "authorization" in headers else [])
            except RpcFailure as failure:
                assert failure.code == grpc.StatusCode.UNAUTHENTICATED
                return _error(401, failure.message, "authentication_error", "invalid_api_key")
        if self.in_flight >= config.max_in_flight:
            message = f"the server has {self.in_flight} requests in flight, its limit; retry shortly"
            return _error(503, message, "server_error", "server_busy", {"Retry-After": "1"})
        limit = config.body_limit(scope.get("path", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            message = f"the request body is {int(declared)} bytes; the limit of this route is {limit}"
            return _error(413, message, "invalid_request_error", "request_too_large")
        return None

    def _paced(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.config.body_limit(scope.get("path", ""))
        timeout = self.config.body_timeout
        seen = 0
        done = False

        async def limited() -> Message:
            nonlocal seen, done
            if done:  # the body is in: what comes next is `http.disconnect`, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise HTTPException(408, f"the request body stalled for more than {timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > limit:
                    raise HTTPException(413, f"the request body exceeds the limit of this route, {limit} bytes")
            else:
                done = True
            return message

        return limited
