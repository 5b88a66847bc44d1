"""All four services in one process: the gateway on --port (and its HTTP API on --http-port, 8000 by default here),
the stages on 127.0.0.1 (--encoder/--denoiser/--vae), which require the internal token (a random one per process
unless --internal-token-file gives one).

Also where each single service becomes its listening endpoint, so `serve` has one code path.
"""

from __future__ import annotations

import argparse

from imagegen.common.serving.auth import InternalToken, TokenInterceptor
from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.server import Endpoint
from imagegen.common.serving.tls import TlsConfig
from imagegen.services import denoiser, encoder, gateway, vae

STAGES = {"encoder": encoder, "denoiser": denoiser, "vae": vae}


def _loopback_port(address: str, flag: str) -> int:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise ConfigError(f"{flag} {address!r}: in 'serve all' the stages listen on 127.0.0.1:PORT")
    return int(port)


def endpoints(args: argparse.Namespace, tls: TlsConfig) -> list[Endpoint]:
    """The endpoints `args.service` starts, gateway first (it drains first, while the stages still serve)."""
    if args.service == "gateway":
        return [Endpoint(gateway.make_service(args, tls), args.host, args.port, tls.server_credentials(internal=False))]
    checks = [TokenInterceptor(InternalToken(tls.internal_token))] if tls.internal_token else []
    if args.service in STAGES:
        service = STAGES[args.service].make_service(args)
        return [Endpoint(service, args.host, args.port, tls.server_credentials(internal=True), checks)]
    if args.routes:
        raise ConfigError("'serve all' hosts one model: --routes does not apply")
    # Loopback stages use mTLS only when a CA is configured (the gateway's internal channels follow the CA).
    internal = tls.server_credentials(internal=True) if tls.ca is not None else None
    result = [Endpoint(gateway.make_service(args, tls), args.host, args.port, tls.server_credentials(internal=False))]
    for name, module in STAGES.items():
        port = _loopback_port(getattr(args, name), f"--{name}")
        result.append(Endpoint(module.make_service(args), "127.0.0.1", port, internal, checks))
    return result
