"""What one request may cost, and how much each API key may spend: the gateway's cost model, per-key quotas and
fair queueing across keys.

Work is counted in megapixel-steps: images x width x height x steps x branches (2 with true CFG) / 2^20. One
request may ask for at most `max_request_work` (INVALID_ARGUMENT beyond, naming the limit: no retry helps).

Per key (the caller's API key id; every caller is one tenant when no keys are configured):
- `key_in_flight`: requests admitted and not yet answered; one more is RESOURCE_EXHAUSTED `QUOTA_IN_FLIGHT`.
- `key_work_per_minute`: a token bucket of work refilled continuously (a full minute's worth at most); a request
  costing more than is left is RESOURCE_EXHAUSTED `QUOTA_WORK_PER_MINUTE` with the wait as its retry hint.
Both are checked before the request waits for anything, so a tenant flooding its quota is answered at once.

`max_active` bounds the requests running through the stages at once (all keys together). Those beyond it wait in
one queue per key, and a freed slot goes to the keys in turn (round robin), so one tenant's backlog cannot
starve another's: the next request of a key that has been waiting runs after at most one request of each other
key. A request waits within its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from imagegen.common.errors import InvalidArgument
from imagegen.common.options import ResolvedOptions
from imagegen.common.serving.status import RpcFailure, with_reason

QUOTA_IN_FLIGHT = "QUOTA_IN_FLIGHT"
QUOTA_WORK_PER_MINUTE = "QUOTA_WORK_PER_MINUTE"
ANONYMOUS = "-"  # the one tenant of a gateway without API keys
MEGA = float(1 << 20)


def request_work(options: ResolvedOptions) -> float:
    """The request's work in megapixel-steps (see the module doc)."""
    branches = 2 if options.uses_cfg else 1
    return options.num_images * options.width * options.height * options.steps * branches / MEGA


def check_work(options: ResolvedOptions, max_work: float) -> float:
    """The request's work; INVALID_ARGUMENT when it is over the per-request limit (0: no limit)."""
    work = request_work(options)
    if max_work and work > max_work:
        raise InvalidArgument(
            "steps",
            f"the request is {work:.4g} megapixel-steps (images x width x height x steps x CFG branches / 2^20); "
            f"the limit is {max_work:.4g}: ask for fewer or smaller images or fewer steps",
        )
    return work


@dataclass(frozen=True)
class QuotaConfig:
    key_in_flight: int = 16  # 0: no limit
    key_work_per_minute: float = 0.0  # megapixel-steps; 0: no limit
    max_active: int = 32  # 0: no limit (and no queueing)


class _Bucket:
    def __init__(self, capacity: float, now: float) -> None:
        self.capacity, self.tokens, self.stamp = capacity, capacity, now

    def take(self, amount: float, now: float) -> float | None:
        """Take `amount`; None when taken, else the seconds until it would be there."""
        rate = self.capacity / 60.0
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if amount <= self.tokens:
            self.tokens -= amount
            return None
        return (amount - self.tokens) / rate


class FairSlots:
    """`size` slots handed out round robin across keys (FIFO within a key)."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()

    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    async def acquire(self, key: str) -> None:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(future)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # granted as we were cancelled: pass it on
            else:
                queue = self._waiting.get(key)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[key]
            raise

    def release(self) -> None:
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            del self._waiting[key]
            if queue:
                self._waiting[key] = queue  # to the back of the line: the other keys go first
            if not future.done():
                future.set_result(None)
                return
        self.free += 1


class Quotas:
    def __init__(self, config: QuotaConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._slots = FairSlots(config.max_active) if config.max_active else None

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    @contextlib.contextmanager
    def hold(self, key: str):
        """Count one request of `key` in flight while inside; RESOURCE_EXHAUSTED when it has its quota."""
        limit = self.config.key_in_flight
        held = self._in_flight.get(key, 0)
        if limit and held >= limit:
            raise with_reason(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                QUOTA_IN_FLIGHT,
                f"quota in_flight: this key has {held} requests in flight; the limit is {limit}",
                1.0,
            )
        self._in_flight[key] = held + 1
        try:
            yield
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

    def charge(self, key: str, work: float) -> None:
        """Take `work` from the key's per-minute budget; RESOURCE_EXHAUSTED (with the wait) when it lacks it."""
        capacity = self.config.key_work_per_minute
        if not capacity:
            return
        now = self.clock()
        if len(self._buckets) > 100_000:  # bounded: full buckets carry no state worth keeping
            self._buckets = {k: b for k, b in self._buckets.items() if b.tokens < b.capacity}
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        wait = bucket.take(work, now)
        if wait is None:
            return
        message = f"quota work_per_minute: the request is {work:.3g} megapixel-steps; this key's limit is "
        message += f"{capacity:.3g} a minute"
        if work > capacity:
            raise with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, QUOTA_WORK_PER_MINUTE, message + " (never enough)")
        raise with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, QUOTA_WORK_PER_MINUTE, message, max(wait, 0.1))

    @contextlib.asynccontextmanager
    async def turn(self, key: str, timeout: float | None) -> AsyncIterator[None]:
        """Wait (at most `timeout` seconds) for a slot among `max_active`, fairly across keys, and hold it."""
        if self._slots is None:
            yield
            return
        try:
            async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
                await self._slots.acquire(key)
        except TimeoutError:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for a free slot") from None
        try:
            yield
        finally:
            self._slots.release()
