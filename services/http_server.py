"""uvicorn on the gateway's event loop, started and drained with its gRPC server (`Service.listeners`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from imagegen.common.serving.config import ConfigError

log = logging.getLogger("imagegen.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM is the process's (common/serving/server.py): it drains HTTP together with gRPC


class HttpListener:
    """An ASGI app on host:port (TLS when given a certificate), served until `stop`."""

    def __init__(self, app, host: str, port: int, certfile: str | None, keyfile: str | None) -> None:
        self.app, self.host, self.port = app, host, port
        self.certfile, self.keyfile = certfile, keyfile
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

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
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
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
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        await self._task
