"""The API key file of the public port: one key per line, re-read whenever it changes.

A line is a key once stripped of whitespace (a leading BOM and CRLF endings included); empty lines and lines
whose first non-blank character is `#` are ignored. A line `sha256:<64 hex>` is the SHA-256 digest of a key, so
the file (or Secret) need not hold the key itself. Plaintext keys shorter than `min_length` are refused (logged
by line number, never by value).

Keys are kept and compared as SHA-256 digests, every key every time, so the time a check takes tells nothing
about any key. A check returns the key's id (the first 12 hex digits of its digest): what quotas are counted
against and what the access log names, without revealing the key.

Revocation fails closed: when the file is deleted, emptied or unreadable after start-up, no key is valid until it
is readable again (an ERROR is logged on each failed reload). A Kubernetes Secret swaps its files atomically
(a symlink flip), so a rotation never passes through a missing file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import grpc

from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.status import RpcFailure

log = logging.getLogger("imagegen.keys")
MIN_KEY_LENGTH = 12
HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
ERROR_LOG_INTERVAL_S = 10.0


def key_id(digest: bytes) -> str:
    return digest.hex()[:12]


def parse_keys(text: str, min_length: int = MIN_KEY_LENGTH, source: str = "keys") -> list[bytes]:
    """The digests of the keys in a key file's text (see the module doc)."""
    digests = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        hashed = HASHED.fullmatch(line)
        if hashed:
            digests.append(bytes.fromhex(hashed.group(1)))
        elif len(line) < min_length:
            log.error("API key refused: shorter than the minimum", extra={"file": source, "line": number})
        else:
            digests.append(_digest(line.encode()))
    return digests


class ApiKeys:
    def __init__(self, path: str | os.PathLike, min_length: int = MIN_KEY_LENGTH) -> None:
        self.path = Path(path)
        self.min_length = min_length
        self._stamp: tuple[int, int, int] | None = None
        self._logged = 0.0
        self._keys: list[bytes] = []  # SHA-256 digests
        self._reload(force=True)
        if not self._keys:
            raise ConfigError(f"--api-keys-file {self.path}: no usable keys in it")

    def _reload(self, force: bool = False) -> None:
        try:  # one stat() per check: microseconds, and a revoked key stops working at once
            stat = self.path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            if self._stamp is None and force:
                raise ConfigError(f"--api-keys-file {self.path}: {reason}") from exc
            self._fail_closed(reason)
            return
        self._keys = parse_keys(text, self.min_length, str(self.path))
        self._stamp = stamp
        if not self._keys:
            self._fail_closed("no usable keys in it")

    def _fail_closed(self, reason: str) -> None:
        self._keys, self._stamp = [], None
        now = time.monotonic()
        if now - self._logged >= ERROR_LOG_INTERVAL_S:
            self._logged = now
            log.error("API key file unusable: every key is refused until it is fixed", extra={"reason": reason})

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The id of the key the metadata carries; raises UNAUTHENTICATED unless it is one of the keys."""
        self._reload()
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <key>' metadata")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <key>'")
        candidate = _digest(token.strip().encode(errors="replace"))
        # Compare against every key so the time taken does not tell which one nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return key_id(candidate)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
