"""Optional API keys for the public port: `authorization: Bearer KEY` metadata, keys one per line in a file.

The file is re-read when it changes, so a rotated Kubernetes Secret takes effect without a restart. A line is
a key once stripped of whitespace (a leading BOM and CRLF endings included); empty lines and lines whose first
non-blank character is `#` are ignored. Keys are kept and compared as SHA-256 digests, every key every time, so
the time a check takes tells nothing about any key (not even its length).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.status import RpcFailure


class ApiKeys:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: list[bytes] = []  # SHA-256 digests
        self._reload()
        if not self._keys:
            raise ConfigError(f"--api-keys-file {self.path}: no keys in it")

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            lines = self.path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            if self._stamp is None:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(f"--api-keys-file {self.path}: {reason}") from exc
            return  # keep the last good keys while a Secret is being swapped
        keys = (line.strip() for line in lines)
        self._keys = [_digest(key.encode()) for key in keys if key and not key.startswith("#")]
        self._stamp = stamp

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raise UNAUTHENTICATED unless the metadata carries one of the keys."""
        self._reload()
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <key>' metadata")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <key>'")
        candidate = _digest(token.strip().encode())
        # Compare against every key so the time taken does not tell which one nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
