"""The prompt-embedding cache: content keys, a Redis store that never fails a request, an in-process LRU.

A key names everything that determines the embeddings (model, checkpoint revision, template version, dtype,
device type, prompt, max_sequence_length, the input images' bytes), so replicas share entries safely and a
replaced checkpoint or template never serves stale tensors. Values are safetensors bytes (`imagegen.common.wire`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

KEY_PREFIX = "imagegen:emb:v1:"


@dataclass(frozen=True)
class EmbeddingKey:
    model_id: str
    revision: str
    template_version: str
    dtype: str
    device_type: str
    prompt: str
    max_sequence_length: int
    image_digests: tuple[str, ...] = ()

    def __str__(self) -> str:
        fields = [
            self.model_id,
            self.revision,
            self.template_version,
            self.dtype,
            self.device_type,
            self.prompt,
            self.max_sequence_length,
            list(self.image_digests),
        ]
        # Hashed: prompts can be long, and the digest keeps Redis keys a fixed size.
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
        return KEY_PREFIX + hashlib.sha256(payload).hexdigest()


def image_digests(images: Sequence[bytes]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(data).hexdigest() for data in images)


class CacheUnavailable(Exception):
    """The shared cache did not answer in time or refused; callers fall back to inline tensors."""


class LruBytes:
    """A thread-safe LRU of bytes values bounded by the total size of keys and values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        cost = len(key) + len(value)
        if cost > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(key) + len(old)
            self._items[key] = value
            self.size += cost
            while self.size > self.max_bytes:
                evicted_key, evicted = self._items.popitem(last=False)
                self.size -= len(evicted_key) + len(evicted)

    def __len__(self) -> int:
        return len(self._items)


class RedisStore:
    """Redis with short timeouts, no client retries, and a cool-down after a failure.

    Every error surfaces as `CacheUnavailable` at once; for `cooldown` seconds after one, calls fail without
    touching the network, so a dead or hung Redis costs one timeout, not one per request.
    """

    def __init__(self, url: str, ttl: int, timeout: float, password: str | None = None, cooldown: float = 2.0):
        self.ttl = ttl
        self.timeout = timeout
        self.cooldown = cooldown
        self._down_until = 0.0
        self._client = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def _call(self, op: str, *args, **kwargs):
        if time.monotonic() < self._down_until:
            raise CacheUnavailable("redis cooling down after an error")
        try:
            # wait_for bounds the whole command, including a connect that hangs past socket timeouts.
            return await asyncio.wait_for(getattr(self._client, op)(*args, **kwargs), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self.cooldown
            raise CacheUnavailable(f"redis {op} failed: {type(exc).__name__}: {exc}") from exc

    async def touch(self, key: str) -> bool:
        """Refresh the TTL; True when the key exists (a hit without moving the value)."""
        return bool(await self._call("expire", key, self.ttl))

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", key)

    async def put(self, key: str, value: bytes) -> None:
        await self._call("set", key, value, ex=self.ttl)

    async def close(self) -> None:
        await self._client.aclose()
