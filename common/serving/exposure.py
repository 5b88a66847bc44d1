"""Closed by default: what a service may listen on without credentials, and the internal token.

Every service listens on loopback unless --host says otherwise. Beyond loopback, the public gateway needs API
keys and a stage needs the internal token, unless --allow-unauthenticated says that is intended (a warning is
logged either way). `serve all` makes a random internal token per process when none is configured, so other
local users cannot reach its stages' loopback ports.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
from pathlib import Path

from imagegen.common.serving.auth import InternalToken
from imagegen.common.serving.config import ConfigError

log = logging.getLogger("imagegen.exposure")
PUBLIC = ("gateway", "all")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def internal_token(args: argparse.Namespace) -> str | None:
    """The internal token from --internal-token-file, else a random one for `serve all`, else None."""
    path = getattr(args, "internal_token_file", None)
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--internal-token-file {path}: cannot read it") from exc
        try:
            InternalToken(token)
        except ValueError as exc:
            raise ConfigError(f"--internal-token-file {path}: {exc}") from exc
        return token
    if args.service == "all":
        return secrets.token_urlsafe(32)
    return None


def check_exposure(args: argparse.Namespace, token: str | None) -> None:
    """Refuse (ConfigError) or warn about listening beyond loopback without credentials."""
    allowed = getattr(args, "allow_unauthenticated", False)
    exposed = not is_loopback(args.host)
    if args.service in PUBLIC and exposed:
        if not args.api_keys_file:
            if not allowed:
                raise ConfigError(
                    f"--host {args.host} without --api-keys-file would let anyone who reaches it spend this "
                    "server's accelerators: give keys, or --allow-unauthenticated if that is intended"
                )
            log.warning("listening beyond loopback without API keys", extra={"host": args.host})
        elif not args.tls_cert:
            log.warning("API keys configured without TLS: they travel in plaintext", extra={"host": args.host})
    if args.service not in PUBLIC and exposed and token is None:
        if not allowed:
            raise ConfigError(
                f"--host {args.host} without --internal-token-file would let anyone who reaches this stage run "
                "work on it: give the internal token, or --allow-unauthenticated if that is intended"
            )
        log.warning("stage listening beyond loopback without the internal token", extra={"host": args.host})
    if not is_loopback(args.metrics_host):
        log.info("metrics listening beyond loopback", extra={"metrics_host": args.metrics_host})


def resolve_exposure(args: argparse.Namespace) -> str | None:
    """Set `args.host` (loopback unless --host), check what that exposes, and return the internal token."""
    args.host = args.host or "127.0.0.1"
    token = internal_token(args)
    check_exposure(args, token)
    return token
