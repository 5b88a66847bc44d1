"""A bounded FIFO of jobs run one at a time on a worker thread (the denoiser's queue).

The asyncio side submits work and reads events (queue position, each step, result); the worker thread runs the
work with `StepHooks` whose `should_stop` turns true when the RPC is cancelled or its deadline passes, so the
loop stops before its next step and the worker takes the next job.

Everything a denoiser group's rank 0 sends its peers goes out on this one thread: the jobs, a heartbeat while
idle (`idle`), and the final stop (`finish`), so two collectives never race on the control group.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from imagegen.common.denoise import StepHooks
from imagegen.common.errors import Cancelled
from imagegen.common.serving import metrics
from imagegen.common.serving.handlers import QueueFull
from imagegen.common.serving.status import RpcFailure

Work = Callable[[StepHooks], Any]


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
    """One submitted job: its work, deadline, cancellation flag and event stream."""

    def __init__(self, work: Work, deadline: float | None, loop: asyncio.AbstractEventLoop) -> None:
        context = contextvars.copy_context()  # the worker logs with the submitting RPC's request id
        self.work: Work = lambda hooks: context.run(work, hooks)
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
    """`idle` = (seconds, fn): call fn on the worker thread after that long without a job; `finish`: call it on
    the worker thread once the queue is closed and the last job is done."""

    def __init__(
        self,
        capacity: int,
        name: str = "jobs",
        idle: tuple[float, Callable[[], None]] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self._idle = idle
        self._finish = finish
        self._pending: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._closed = False
        self._cond = threading.Condition()
        metrics.QUEUE_CAPACITY.set(capacity)
        self._thread = threading.Thread(target=self._work_loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Work, timeout: float | None = None) -> Ticket:
        """Queue `work` (call from the event loop); raises `QueueFull` when `capacity` jobs already wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = Ticket(work, deadline, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "shutting down")
            if len(self._pending) >= self.capacity:
                raise QueueFull(f"denoiser queue is full ({self.capacity} waiting)")
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
                ticket.post(Event("failed", error=Cancelled("cancelled while queued")))

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
        ahead = 1 if self._running is not None else 0
        for index, ticket in enumerate(self._pending):
            if ahead + index:
                ticket.post(Event("queued", position=ahead + index))
        metrics.QUEUE_DEPTH.set(len(self._pending))

    def _work_loop(self) -> None:
        try:
            while (ticket := self._next()) is not None:
                self._serve(ticket)
        finally:
            if self._finish is not None:
                self._finish()

    def _next(self) -> Ticket | None:
        """The next job (None once closed and empty), running the idle callback while there is none."""
        while True:
            with self._cond:
                if not self._pending and not self._closed:
                    self._cond.wait(self._idle[0] if self._idle else None)
                if self._pending:
                    ticket = self._running = self._pending.popleft()
                    self._announce()
                    return ticket
                if self._closed:
                    return None
            if self._idle is not None:
                self._idle[1]()

    def _serve(self, ticket: Ticket) -> None:
        final = self._run(ticket)
        with self._cond:
            self._running = None  # before the caller hears the outcome: its next job must not look queued
        self._record(ticket, final)
        ticket.post(final)

    def _run(self, ticket: Ticket) -> Event:
        metrics.STAGE_SECONDS.labels("queue_wait").observe(time.monotonic() - ticket.submitted)
        if ticket.should_stop():
            return Event("failed", error=Cancelled("cancelled or past its deadline before it started"))
        ticket.post(Event("started"))

        def on_step(done: int, total: int) -> None:
            metrics.DENOISE_STEPS.inc()
            ticket.post(Event("step", step=done, total=total))

        start = time.monotonic()
        try:
            result = ticket.work(StepHooks(on_step=on_step, should_stop=ticket.should_stop))
        except BaseException as exc:  # the worker must survive any job
            return Event("failed", error=exc)
        metrics.STAGE_SECONDS.labels("denoise").observe(time.monotonic() - start)
        return Event("done", result=result)

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
