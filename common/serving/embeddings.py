"""Prompt embeddings between encoder and denoiser: look up or compute (encoder), fetch by key (denoiser).

With Redis the encoder answers a key and the denoiser reads the tensor from Redis; when Redis fails, the
encoder passes the tensor inline and counts it, so a dead or slow Redis never fails a request. Without Redis
an in-process LRU (bounded in bytes) saves repeated encodes and tensors always travel inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import torch

from imagegen.common.cache import CacheUnavailable, LruBytes, RedisStore
from imagegen.common.errors import InvalidArgument
from imagegen.common.serving import metrics
from imagegen.common.serving.status import EMBEDDINGS_MISSING, with_reason
from imagegen.common.wire import unpack
from imagegen.v1 import encoder_pb2

TENSOR_NAME = "embeds"


Compute = Callable[[Callable[[], bool]], Awaitable[bytes]]  # given "is it still wanted?", the tensor's bytes


class _Flight:
    """One encode shared by every concurrent request for its key."""

    def __init__(self, compute: Compute) -> None:
        self.waiters = 0
        self.task = asyncio.ensure_future(compute(self.abandoned))

    def abandoned(self) -> bool:
        """Every request that wanted it has gone (read from the compute thread: a plain int read)."""
        return self.waiters == 0


class EmbeddingCache:
    def __init__(self, store: RedisStore | None, lru: LruBytes) -> None:
        self.store = store
        self.lru = lru
        self._inflight: dict[str, _Flight] = {}  # key -> the encode running for it

    async def get_or_compute(self, key: str, inline: bool, compute: Compute) -> tuple[encoder_pb2.Embeddings, bool]:
        """Embeddings for `key` (a cache key or inline bytes) and whether it was a hit."""
        shared_ok = self.store is not None
        if self.store is not None:
            try:
                if inline:
                    data = await self.store.get(key)
                    if data is not None:
                        metrics.CACHE_LOOKUPS.labels("encoder", "redis", "hit").inc()
                        return encoder_pb2.Embeddings(safetensors=data), True
                elif await self.store.touch(key):
                    metrics.CACHE_LOOKUPS.labels("encoder", "redis", "hit").inc()
                    return encoder_pb2.Embeddings(key=key), True
                metrics.CACHE_LOOKUPS.labels("encoder", "redis", "miss").inc()
            except CacheUnavailable:
                metrics.CACHE_LOOKUPS.labels("encoder", "redis", "error").inc()
                shared_ok = False
        else:
            data = self.lru.get(key)
            if data is not None:
                metrics.CACHE_LOOKUPS.labels("encoder", "lru", "hit").inc()
                return encoder_pb2.Embeddings(safetensors=data), True
            metrics.CACHE_LOOKUPS.labels("encoder", "lru", "miss").inc()

        data = await self._single_flight(key, compute)
        if self.store is None:
            self.lru.put(key, data)
            return encoder_pb2.Embeddings(safetensors=data), False
        if shared_ok:
            try:
                await self.store.put(key, data)
                if not inline:
                    return encoder_pb2.Embeddings(key=key), False
            except CacheUnavailable:
                shared_ok = False
        if not shared_ok and not inline:
            metrics.CACHE_INLINE_FALLBACKS.labels("encoder").inc()
        return encoder_pb2.Embeddings(safetensors=data), False

    async def _single_flight(self, key: str, compute: Compute) -> bytes:
        """Concurrent requests for one key share one encode, which finishes even if its first caller leaves;
        it is dropped only when every caller has (before it starts)."""
        flight = self._inflight.get(key)
        if flight is None:
            flight = self._inflight[key] = _Flight(compute)
            flight.task.add_done_callback(lambda done: self._finished(key, done))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1

    def _finished(self, key: str, task: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every caller may have gone


async def load_embeddings(message: encoder_pb2.Embeddings, store: RedisStore | None, field: str) -> torch.Tensor:
    """The denoiser's side: inline bytes, or the tensor the key names in Redis (EMBEDDINGS_MISSING if gone)."""
    if message.safetensors:
        return unpack(message.safetensors, TENSOR_NAME, field)
    if not message.key:
        raise InvalidArgument(field, "needs a cache key or inline safetensors bytes")
    if store is None:
        raise with_reason(
            grpc.StatusCode.FAILED_PRECONDITION, EMBEDDINGS_MISSING, f"{field}: this denoiser has no cache; send inline"
        )
    try:
        data = await store.get(message.key)
    except CacheUnavailable as exc:
        metrics.CACHE_LOOKUPS.labels("denoiser", "redis", "error").inc()
        raise with_reason(grpc.StatusCode.FAILED_PRECONDITION, EMBEDDINGS_MISSING, f"{field}: {exc}") from exc
    if data is None:
        metrics.CACHE_LOOKUPS.labels("denoiser", "redis", "miss").inc()
        raise with_reason(grpc.StatusCode.FAILED_PRECONDITION, EMBEDDINGS_MISSING, f"{field}: key not in the cache")
    metrics.CACHE_LOOKUPS.labels("denoiser", "redis", "hit").inc()
    return unpack(data, TENSOR_NAME, field)
