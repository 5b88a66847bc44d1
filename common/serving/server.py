"""Server bootstrap shared by every service: gRPC (asyncio) with health and reflection, metrics, TLS, JSON
logs, and a graceful drain on SIGTERM.

Health reports NOT_SERVING from the moment the port opens until the service's `prepare` (model loading,
backend discovery) finishes, then SERVING. On SIGTERM (a rolling update) it flips back to NOT_SERVING and the
process drains: its ports close, so new calls fail UNAVAILABLE at once (gRPC; HTTP clients see the connection
refused) and go to another replica, while every request already taken (running, or waiting in a queue) runs on
to its end, within its own deadline, for up to `drain_timeout` seconds in all; then what is left is cancelled
and the process exits 0. A service that hits a fault it cannot recover from calls `Service.fail`: NOT_SERVING
at once, a short drain, exit status 1 (its supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagegen_client.transport import DEFAULT_MESSAGE_LIMIT, server_options

from imagegen.common.errors import ImagegenError
from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.health import NOT_SERVING, SERVING, Health
from imagegen.common.serving.malformed import MalformedRequests
from imagegen.common.serving.metrics import start_metrics_server

log = logging.getLogger("imagegen.server")
FAILURE_GRACE_S = 2.0  # after a fatal fault: time to answer the RPCs already failed, then exit


@dataclass
class Service:
    """One gRPC service and its lifecycle hooks."""

    name: str  # full proto name, e.g. imagegen.v1.EncoderService (also its health service name)
    register: Callable[[grpc.aio.Server], None]
    prepare: Callable[[], Awaitable[None]]  # load models / discover backends; SERVING once it returns
    close: Callable[[], Awaitable[None]] | None = None  # after the drain
    max_receive_bytes: int = DEFAULT_MESSAGE_LIMIT
    internal: bool = True
    # Server interceptors (the API-key check of the public port) and the bound on RPCs in flight: beyond it
    # gRPC answers RESOURCE_EXHAUSTED at once instead of taking more work into memory.
    interceptors: list[Any] = field(default_factory=list)
    max_concurrent_rpcs: int | None = None
    # Other listeners in front of the same servicer (the gateway's HTTP API): started after the gRPC server,
    # stopped with it. Each has `async start()` and `async stop(grace)`.
    listeners: list[Any] = field(default_factory=list)
    _on_fail: Callable[[str], None] | None = field(default=None, init=False, repr=False)

    def fail(self, reason: str) -> None:
        """A fault this process cannot recover from (any thread): NOT_SERVING now, then exit with status 1."""
        log.critical("fatal: %s", reason)
        if self._on_fail is not None:
            self._on_fail(reason)


@dataclass
class Endpoint:
    service: Service
    host: str
    port: int
    credentials: grpc.ServerCredentials | None = None
    interceptors: list[Any] = field(default_factory=list)  # e.g. the internal token check of a stage
    server: grpc.aio.Server | None = field(default=None, init=False)
    health: Health | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(
            options=server_options(self.service.max_receive_bytes, self.service.internal),
            # Credentials first (refused calls are never parsed), then malformed messages -> INVALID_ARGUMENT.
            interceptors=[*self.interceptors, *self.service.interceptors, MalformedRequests()],
            maximum_concurrent_rpcs=self.service.max_concurrent_rpcs,
        )
        self.health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.service.register(server)
        names = (self.service.name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        try:
            if self.credentials is None:
                bound = server.add_insecure_port(self.address)
            else:
                bound = server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:
            raise ConfigError(f"{self.service.name}: cannot listen on {self.address}: {exc}") from exc
        if not bound:
            raise ConfigError(f"{self.service.name}: cannot listen on {self.address}")
        await self.set_health(False)
        await server.start()
        self.server = server
        log.info(
            "listening",
            extra={"grpc_service": self.service.name, "address": self.address, "tls": bool(self.credentials)},
        )
        for listener in self.service.listeners:
            await listener.start()

    async def set_health(self, serving: bool) -> None:
        for name in ("", self.service.name):
            await self.health.set(name, SERVING if serving else NOT_SERVING)


class RateLimitedExceptions:
    """The event loop's exception handler, each distinct message logged at most once per `interval` (with a
    count of those dropped): at the fd limit asyncio reports every failed accept(), hundreds of thousands of
    lines a second, which would flood the log and starve the process."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "unhandled exception in the event loop"))[:200]
        now = self.clock()
        if now - self._last.get(message, -math.inf) < self.interval:
            self._dropped[message] = self._dropped.get(message, 0) + 1
            return
        if len(self._last) > 1000:  # bounded, whatever the messages
            self._last.clear()
        self._last[message] = now
        dropped = self._dropped.pop(message, 0)
        exc = context.get("exception")
        log.error(message, exc_info=exc if isinstance(exc, BaseException) else None, extra={"repeats": dropped})


async def _health_server(host: str, port: int, servicer: Health) -> grpc.aio.Server:
    """A plaintext listener with only grpc.health.v1.Health (the first endpoint's statuses): kubelet gRPC probes
    cannot speak TLS."""
    server = grpc.aio.server(options=server_options(1 << 20, internal=False))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"health port: cannot listen on {address}: {exc}") from exc
    if not bound:
        raise ConfigError(f"health port: cannot listen on {address}")
    await server.start()
    log.info("health listening", extra={"address": address})
    return server


async def serve(
    endpoints: list[Endpoint],
    drain_timeout: float,
    metrics_host: str,
    metrics_port: int,
    health_port: int = 0,
    health_host: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; drain the endpoints in list order (put the gateway first), all within one
    `drain_timeout`. Returns the exit code.

    With `health_port`, a plaintext health listener mirrors the first endpoint's health; it stops last, so
    probes see NOT_SERVING (not a refused connection) during the drain."""
    stop = asyncio.Event()
    failed: list[str] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.set_exception_handler(RateLimitedExceptions())

    def on_fail(reason: str) -> None:
        def record() -> None:
            failed.append(reason)
            stop.set()

        loop.call_soon_threadsafe(record)

    for endpoint in endpoints:
        endpoint.service._on_fail = on_fail
    metrics_server = None
    health_server = None
    code = 0
    try:
        metrics_server = start_metrics_server(metrics_port, metrics_host)
        if metrics_port:
            log.info("metrics listening", extra={"address": f"{metrics_host}:{metrics_port}"})
        for endpoint in endpoints:
            await endpoint.start()
        if health_port:
            # Probes come to the service's own address (the pod IP), wherever metrics listen.
            health_server = await _health_server(health_host or metrics_host, health_port, endpoints[0].health)
        code = await _prepare_until_stopped(endpoints, stop)
        if code == 0:
            await stop.wait()
            if not failed:
                log.info("draining", extra={"drain_timeout_s": drain_timeout})
    except ConfigError as exc:
        log.error(str(exc))
        code = 2
    finally:
        if failed:
            code, drain_timeout = max(code, 1), min(drain_timeout, FAILURE_GRACE_S)
        started = loop.time()
        # One limit for the whole process (what the chart's terminationGracePeriodSeconds is sized from), in
        # order: `serve all`'s stages keep serving until its gateway's requests are done with them, then get
        # what is left of it.
        for endpoint in endpoints:
            if endpoint.health is not None:
                await endpoint.health.drain()
            if endpoint.server is not None:
                left = max(0.0, started + drain_timeout - loop.time())
                listeners = (listener.stop(left) for listener in endpoint.service.listeners)
                await asyncio.gather(endpoint.server.stop(left), *listeners)
        if endpoints and endpoints[0].server is not None:
            log.info("drained", extra={"drain_s": round(loop.time() - started, 3)})
        for endpoint in endpoints:
            if endpoint.service.close is not None:
                await endpoint.service.close()
        if health_server is not None:
            await health_server.stop(0)
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("stopped", extra={"exit_code": code})
    return code


async def _prepare_until_stopped(endpoints: list[Endpoint], stop: asyncio.Event) -> int:
    async def prepare(endpoint: Endpoint) -> None:
        await endpoint.service.prepare()
        await endpoint.set_health(True)
        log.info("serving", extra={"grpc_service": endpoint.service.name})

    tasks = [asyncio.create_task(prepare(e)) for e in endpoints]
    stopper = asyncio.create_task(stop.wait())
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                return 0  # SIGTERM while starting: drain what is up
            pending.discard(stopper)
            for task in done:
                error = task.exception()
                if isinstance(error, ImagegenError):  # a configuration or model problem: one clear line
                    log.error(f"start-up failed: {error}")
                    return 1
                if error is not None:
                    log.error("start-up failed", exc_info=error)
                    return 1
        return 0
    finally:
        for task in (*tasks, stopper):
            task.cancel()
