"""A bounded FIFO of jobs run on a worker thread (the denoiser's queue), in batches (a job alone is a batch of one).

The asyncio side submits a job's payload and reads events (queue position, each step, result); the worker thread
runs batches of payloads through the queue's one `run(payloads, hooks)`, each member with `StepHooks` whose
`should_stop` turns true when its RPC is cancelled or its deadline passes, so the loop stops it before its next
step.

The worker takes the oldest job and, from the rest of the queue in order, up to `Batching.max_size - 1` later
jobs with the same batch key, waiting at most `wait_s` for more to arrive (never longer; 0
takes only what is queued). Each member keeps its own hooks (progress, cancellation, deadline). No job starves:
every batch starts with the oldest waiting job, so a job that is incompatible with the batches before it is
the head of a batch once the jobs older than it have started (compatible later jobs only ever join a batch
that an older job heads).

Everything a denoiser group's rank 0 sends its peers goes out on this one thread: the jobs, a heartbeat while
idle (`idle`), and the final stop (`finish`), so two collectives never race on the control group.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import grpc

from imagegen.common.denoise import StepHooks
from imagegen.common.errors import Cancelled
from imagegen.common.serving import metrics
from imagegen.common.serving.handlers import QueueFull
from imagegen.common.serving.status import RpcFailure

# (the members' payloads, their hooks) -> one result or exception per member, in order.
BatchWork = Callable[[list[Any], list[StepHooks]], list[Any]]


@dataclass(frozen=True)
class Batching:
    """How the worker forms batches: at most `max_size` jobs, at most `wait_s` waited for them (the default:
    every job alone)."""

    max_size: int = 1
    wait_s: float = 0.0


@dataclass(frozen=True)
class Event:
    kind: str  # "queued", "started", "step", "done" or "failed"
    position: int = 0  # jobs ahead ("queued")
    step: int = 0
    total: int = 0
    result: Any = None
    error: BaseException | None = None

    @property
    def final(self) -> bool:
        return self.kind in ("done", "failed")


class Ticket:
    """One submitted job: its payload, deadline, cancellation flag and event stream."""

    def __init__(
        self,
        payload: Any,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        key: Hashable | None = None,
    ) -> None:
        self.context = contextvars.copy_context()  # the worker logs with the submitting RPC's id
        self.payload = payload  # what the queue's `run` receives for this job
        self.key = key  # jobs with equal keys may share a batch (None: never batched)
        self.deadline = deadline
        self.submitted = time.monotonic()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._stop = threading.Event()
        self._last_position: int | None = None

    def cancel(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def post(self, event: Event) -> None:
        if event.kind == "queued":
            if event.position == self._last_position:
                return
            self._last_position = event.position
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if event.final:
                return


class JobQueue:
    """`run` does the work of every batch; `name` names the worker thread and the errors callers see; `idle` =
    (seconds, fn): call fn on the worker thread after that long without a job; `finish`: call it on the worker
    thread once the queue is closed and the last job is done."""

    def __init__(
        self,
        capacity: int,
        run: BatchWork,
        name: str = "jobs",
        batching: Batching = Batching(),
        idle: tuple[float, Callable[[], None]] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.name = name
        self._run = run
        self._batching = batching
        self._idle = idle
        self._finish = finish
        self._pending: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._closed = False
        self._cond = threading.Condition()
        metrics.QUEUE_CAPACITY.set(capacity)
        self._thread = threading.Thread(target=self._work_loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any, timeout: float | None = None, key: Hashable | None = None) -> Ticket:
        """Queue a job (call from the event loop); raises `QueueFull` when `capacity` jobs already wait. `key`
        lets it share a batch with other jobs of the same key (None: it always runs alone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = Ticket(payload, deadline, asyncio.get_running_loop(), key)
        with self._cond:
            if self._closed:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{self.name}: shutting down")
            if len(self._pending) >= self.capacity:
                raise QueueFull(f"{self.name} queue is full ({self.capacity} waiting)")
            self._pending.append(ticket)
            self._announce()
            self._cond.notify()
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """Cancel a job: dropped if it still waits, stopped before its next step if it runs."""
        ticket.cancel()
        with self._cond:
            if ticket in self._pending:
                self._pending.remove(ticket)
                self._announce()
                final = Event("failed", error=Cancelled("cancelled while queued"))
                self._record(ticket, final)  # every submitted job gets one outcome, also one that never ran
                ticket.post(final)

    def shut(self, error: BaseException | None = None) -> None:
        """Refuse new work and fail the waiting jobs with `error` (UNAVAILABLE by default); the running one
        finishes (or stops, if cancelled). Safe from any thread, the worker's included."""
        error = error or RpcFailure(grpc.StatusCode.UNAVAILABLE, "shut down")
        with self._cond:
            self._closed = True
            while self._pending:
                self._pending.popleft().post(Event("failed", error=error))
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """`shut`, then wait for the worker to finish; False if it did not within `timeout`."""
        self.shut()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _announce(self) -> None:
        """Tell each waiting job how many are ahead of it (a job about to start right away hears nothing)."""
        ahead = len(self._running)
        for index, ticket in enumerate(self._pending):
            if ahead + index:
                ticket.post(Event("queued", position=ahead + index))
        metrics.QUEUE_DEPTH.set(len(self._pending))

    def _work_loop(self) -> None:
        try:
            while (batch := self._next()) is not None:
                self._serve(batch)
        finally:
            if self._finish is not None:
                self._finish()

    def _next(self) -> list[Ticket] | None:
        """The next job and its batch mates (None once closed and empty), running the idle callback while there
        is none."""
        while True:
            with self._cond:
                if not self._pending and not self._closed:
                    self._cond.wait(self._idle[0] if self._idle else None)
                if self._pending:
                    self._running = [self._pending.popleft()]
                    self._announce()
                    self._fill(self._running)
                    return self._running
                if self._closed:
                    return None
            if self._idle is not None:
                self._idle[1]()

    def _fill(self, batch: list[Ticket]) -> None:
        """Move compatible pending jobs (in queue order) into `batch`, waiting up to `wait_s` for more; called
        with the lock held (`wait` releases it, so submissions and withdrawals go on meanwhile)."""
        policy, head = self._batching, batch[0]
        if policy.max_size == 1 or head.key is None:
            return
        start = time.monotonic()
        deadline = start + policy.wait_s
        while True:
            for ticket in [t for t in self._pending if t.key == head.key][: policy.max_size - len(batch)]:
                self._pending.remove(ticket)
                batch.append(ticket)
            self._announce()
            remaining = deadline - time.monotonic()
            if len(batch) >= policy.max_size or self._closed or remaining <= 0:
                break
            self._cond.wait(remaining)
        metrics.BATCH_WAIT_SECONDS.observe(time.monotonic() - start)
        metrics.BATCH_SIZE.observe(len(batch))

    def _serve(self, batch: list[Ticket]) -> None:
        finals = self._run_batch(batch)
        with self._cond:
            self._running = []  # before the callers hear the outcome: their next jobs must not look queued
        for ticket, final in zip(batch, finals, strict=True):
            self._record(ticket, final)
            ticket.post(final)

    def _run_batch(self, batch: list[Ticket]) -> list[Event]:
        """One `run` for the members still wanted; each gets its own outcome."""
        finals: dict[int, Event] = {}
        live = []
        for index, ticket in enumerate(batch):
            metrics.STAGE_SECONDS.labels("queue_wait").observe(time.monotonic() - ticket.submitted)
            if ticket.should_stop():
                finals[index] = Event("failed", error=Cancelled("cancelled or past its deadline before it started"))
            else:
                ticket.post(Event("started"))
                live.append(index)
        hooks = [StepHooks(on_step=self._progress(batch[i]), should_stop=batch[i].should_stop) for i in live]
        start = time.monotonic()
        try:
            # The head's context: the batch logs under the oldest member's request id.
            results = batch[0].context.run(self._run, [batch[i].payload for i in live], hooks) if live else []
        except BaseException as exc:  # the worker must survive any batch; every member hears the error
            results = [exc] * len(live)
        if live:
            metrics.STAGE_SECONDS.labels("denoise").observe(time.monotonic() - start)
        for index, result in zip(live, results, strict=True):
            failed = isinstance(result, BaseException)
            finals[index] = Event("failed", error=result) if failed else Event("done", result=result)
        return [finals[i] for i in range(len(batch))]

    @staticmethod
    def _progress(ticket: Ticket) -> Callable[[int, int], None]:
        def on_step(done: int, total: int) -> None:
            metrics.DENOISE_STEPS.inc()
            ticket.post(Event("step", step=done, total=total))

        return on_step

    @staticmethod
    def _record(ticket: Ticket, event: Event) -> None:
        if event.kind == "done":
            outcome = "ok"
        elif isinstance(event.error, Cancelled):
            expired = ticket.deadline is not None and time.monotonic() >= ticket.deadline
            outcome = "deadline" if expired else "cancelled"
        else:
            outcome = "error"
        metrics.JOBS.labels(outcome).inc()
