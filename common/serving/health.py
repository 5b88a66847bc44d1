"""grpc.health.v1.Health whose Watch streams end once the process drains.

Gateways watch every stage's health (client-side health checking, `transport.client_options`), so those streams
are always open. grpcio's own servicer never ends them, and a graceful stop would then wait out its whole grace
period even with no work in flight. Here a Watch stream sends the final NOT_SERVING and ends.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status: int) -> None:
        if self._draining:
            return  # NOT_SERVING for good
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def drain(self) -> None:
        """Report NOT_SERVING for every service from now on and end the Watch streams."""
        async with self._changed:
            self._draining = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        last = None

        def changed() -> bool:
            return self._draining or self._status.get(request.service, SERVICE_UNKNOWN) != last

        while True:
            async with self._changed:  # not held while writing: a slow watcher must not block `set`
                await self._changed.wait_for(changed)
                status, draining = self._status.get(request.service, SERVICE_UNKNOWN), self._draining
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if draining:
                return
