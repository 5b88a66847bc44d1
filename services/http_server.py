"""uvicorn on the gateway's event loop, started and drained with its gRPC server (`Service.listeners`).

Connections are bounded, and none is held open for free (uvicorn alone waits forever for headers that never
complete, so a few hundred idle sockets once used up the process's file descriptors, gRPC health included):
- at most `max_connections` open; a new one beyond it closes the oldest connection that is still waiting for
  its request's headers (never one whose request is being served), so idle sockets cannot lock callers out;
- a connection waiting for its request's headers longer than `header_timeout` is closed (a slowloris costs us
  one socket for that long);
- an idle keep-alive connection is closed after `keep_alive` seconds (uvicorn's own timer);
- requests in flight and body pacing are the app's `common.serving.admission`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

from imagegen.common.serving.config import ConfigError

log = logging.getLogger("imagegen.http")
METRIC_DROPPED = Counter(
    "imagegen_http_connections_dropped_total", "HTTP connections closed by the connection bounds", ["reason"]
)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM is the process's (common/serving/server.py): it drains HTTP together with gRPC


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    header_timeout: float = 10.0
    keep_alive: int = 5


def _waiting(protocol) -> bool:
    """Whether a connection is between requests (no request whose headers have arrived is being served)."""
    cycle = getattr(protocol, "cycle", None)
    return cycle is None or cycle.response_complete


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection bounds of the module doc."""

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.waiting_since = time.monotonic()
            # Closed connections stay in `connections` until their connection_lost runs (a later loop turn):
            # count only those still open, or a burst of new ones would all be refused.
            live = [c for c in self.connections if c.transport is not None and not c.transport.is_closing()]
            over = len(live) + 1 - limits.max_connections
            idle = sorted((c for c in live if _waiting(c)), key=lambda c: getattr(c, "waiting_since", 0.0))
            for victim in idle[: max(0, over)]:
                victim.transport.abort()
                METRIC_DROPPED.labels("evicted").inc()
            super().connection_made(transport)
            if over > len(idle):  # nobody could make room: every connection is serving a request
                METRIC_DROPPED.labels("refused").inc()
                transport.abort()

        def on_response_complete(self) -> None:
            self.waiting_since = time.monotonic()
            super().on_response_complete()

    return Guarded


async def _sweep(server: uvicorn.Server, limits: ConnectionLimits, interval: float = 1.0) -> None:
    """Close connections that have waited for their headers past the timeout."""
    while True:
        await asyncio.sleep(interval)
        cutoff = time.monotonic() - limits.header_timeout
        for protocol in list(server.server_state.connections):
            if _waiting(protocol) and getattr(protocol, "waiting_since", cutoff) < cutoff:
                METRIC_DROPPED.labels("header_timeout").inc()
                protocol.transport.abort()


class HttpListener:
    """An ASGI app on host:port (TLS when given a certificate), served until `stop`."""

    def __init__(
        self,
        app,
        host: str,
        port: int,
        certfile: str | None,
        keyfile: str | None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.app, self.host, self.port = app, host, port
        self.certfile, self.keyfile = certfile, keyfile
        self.limits = limits or ConnectionLimits()
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--http-port: cannot listen on {self.address}: {exc.strerror}") from exc
        return sock

    async def start(self) -> None:
        sock = self._socket()
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the process's JSON logs; requests are logged by the servicer, as gRPC calls are
            access_log=False,
            ssl_certfile=self.certfile,
            ssl_keyfile=self.keyfile,
            http=guarded_protocol(self.limits),
            server_header=False,  # no banner
            timeout_keep_alive=self.limits.keep_alive,
            # A backstop only: the guarded protocol keeps connections under max_connections, and the app bounds
            # requests in flight with a 503 and Retry-After.
            limit_concurrency=self.limits.max_connections + 16,
            h11_max_incomplete_event_size=64 << 10,  # request line and headers
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        self._sweeper = asyncio.create_task(_sweep(self._server, self.limits))
        while not self._server.started:
            if self._task.done():
                error = self._task.exception()
                raise ConfigError(f"--http-port: cannot serve on {self.address}: {error}")
            await asyncio.sleep(0.01)
        log.info("http listening", extra={"address": self.address, "tls": bool(self.certfile)})

    async def stop(self, grace: float) -> None:
        """Stop taking connections; requests in flight get `grace` seconds to finish."""
        if self._server is None or self._task is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        await self._task
