"""Jobs over a denoiser group: rank 0 broadcasts each job, every rank runs its share, rank 0 gets the latents.

`GroupDenoiser` has the same `run(job, hooks)` as a one-process denoise stage, so the CLI and the denoiser
service use either without knowing which. The other ranks sit in `follow_leader`.

Failure is all-or-nothing: any error but a cancellation (which every rank takes at the same step) leaves some
rank inside a collective the others will never join, so the group is broken for good. Rank 0 raises
`GroupError` (its caller makes the process exit so that a supervisor starts a fresh group); followers let the
error end their process. Jobs are validated on rank 0 before they are broadcast, so bad input never gets here.
While idle, rank 0 sends a heartbeat every so often: followers waiting for the next job would otherwise hit the
collective timeout, and a peer that died while idle is found before the next job needs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from imagegen.common.denoise import DenoiseJob, StepHooks, decode_batch, encode_batch, raise_or_return
from imagegen.common.errors import Cancelled
from imagegen.common.parallel.group import GroupError, ParallelGroup
from imagegen.common.parallel.layout import check_request_fits
from imagegen.common.parallel.sharding import GroupSharding

log = logging.getLogger(__name__)
# Test only, and only with IMAGEGEN_TESTING=1: "RANK:STEP:crash|hang" makes that rank fail, to test fail-fast.
FAULT_ENV = "IMAGEGEN_FAULT_INJECT"
TESTING_ENV = "IMAGEGEN_TESTING"
HEARTBEAT = b"\x01"  # a 1-byte control message; jobs are safetensors blobs (8-byte header length first)


def heartbeat_interval(timeout_s: float) -> float:
    """Well inside the collective timeout, so a waiting follower never times out on an idle group."""
    return min(30.0, max(0.5, timeout_s / 4))


class GroupDenoiser:
    """Rank 0's handle on the group. `failure_hint` names a dead peer where the launcher knows it."""

    def __init__(self, group: ParallelGroup, denoiser, failure_hint: Callable[[], str | None] | None = None) -> None:
        self.group = group
        self.denoiser = denoiser
        self.sharding = GroupSharding(group)
        self.broken = False
        self.closed = False
        self._failure_hint = failure_hint

    def run(self, job: DenoiseJob, hooks: StepHooks | None = None) -> torch.Tensor:
        return raise_or_return(self.run_batch([job], [hooks or StepHooks()])[0])

    def run_batch(self, jobs: list[DenoiseJob], hooks: list[StepHooks]) -> list[torch.Tensor | BaseException]:
        """A batch (`imagegen.common.batching`): every rank runs the same members, and each member's stop
        decision is rank 0's (`imagegen.common.denoise.run_batch_loop`)."""
        for job in jobs:
            check_request_fits(job.options.width, job.options.height, self.group.sp)  # before the broadcast
        flags = [{"capture": "1" if h.on_model_output is not None else "0"} for h in hooks]

        def work() -> list[torch.Tensor | BaseException]:
            self.group.broadcast_bytes(encode_batch(jobs, flags))
            return self.denoiser.run_batch(jobs, hooks, self.sharding)

        return self._guarded(work)

    def heartbeat(self) -> None:
        self._guarded(lambda: self.group.broadcast_bytes(HEARTBEAT))

    def close(self) -> None:
        """Release the other ranks from `follow_leader` (an empty message means stop); once, and never on a
        broken group (nobody would answer)."""
        if self.broken or self.closed:
            return
        self.closed = True
        self._guarded(lambda: self.group.broadcast_bytes(b""))

    def _guarded(self, work: Callable[[], torch.Tensor | bytes]):
        if self.broken:
            raise GroupError("denoiser group failed earlier")
        try:
            return work()
        except Cancelled:
            raise  # every rank stopped before the same step: the group is still in step
        except Exception as exc:  # a collective error, a timeout, or any error on this rank alone
            self.broken = True
            hint = self._failure_hint() if self._failure_hint is not None else None
            raise GroupError(f"denoiser group failed: {hint or exc}") from exc
        except BaseException:  # KeyboardInterrupt, SystemExit mid-collective: the ranks are out of step
            self.broken = True
            raise


def follow_leader(group: ParallelGroup, denoiser) -> None:
    """Non-leader ranks: run every job rank 0 broadcasts, until it says stop. Any error but a cancellation
    ends the process: the group is broken and must be restarted as a whole."""
    sharding = GroupSharding(group)
    while True:
        blob = group.broadcast_bytes(None)
        if not blob:
            return
        if blob == HEARTBEAT:
            continue
        jobs, flags = decode_batch(blob)
        hooks = [
            StepHooks(on_model_output=_ignore if f.get("capture") == "1" else None, on_step=_fault_injector(group.rank))
            for f in flags
        ]
        denoiser.run_batch(jobs, hooks, sharding)  # members that stop come back as Cancelled, not raised


def _ignore(*_args) -> None:
    """Non-leader ranks join the gathers that capturing outputs needs, and drop the result."""


def _fault_injector(rank: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get(TESTING_ENV) != "1":
        return None
    fault_rank, fault_step, mode = spec.split(":")
    if int(fault_rank) != rank:
        return None
    log.warning("fault injection armed: rank %s %ss at step %s", rank, mode, fault_step)

    def inject(done: int, total: int) -> None:
        if done == int(fault_step):
            if mode == "hang":
                time.sleep(10**6)
            os._exit(3)

    return inject
