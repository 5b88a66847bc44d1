"""Jobs over a denoiser group: rank 0 broadcasts each job, every rank runs its share, rank 0 gets the latents.

`GroupDenoiser` has the same `run(job, hooks)` as a one-process denoise stage, so the CLI and the denoiser
service use either without knowing which. The other ranks sit in `follow_leader`.
"""

from __future__ import annotations

import os
import time

import torch

from common.denoise import DenoiseJob, StepHooks, decode_job, encode_job
from common.errors import Cancelled
from common.parallel.group import ParallelGroup
from common.parallel.sharding import GroupSharding

FAULT_ENV = "IMAGEGEN_FAULT_INJECT"  # "RANK:STEP:crash|hang" — makes that rank fail, to test fail-fast


class GroupDenoiser:
    """Rank 0's handle on the group."""

    def __init__(self, group: ParallelGroup, denoiser) -> None:
        self.group = group
        self.denoiser = denoiser
        self.sharding = GroupSharding(group)

    def run(self, job: DenoiseJob, hooks: StepHooks | None = None) -> torch.Tensor:
        hooks = hooks or StepHooks()
        capture = "1" if hooks.on_model_output is not None else "0"
        self.group.broadcast_bytes(encode_job(job, capture=capture))
        return self.denoiser.run(job, hooks, self.sharding)

    def close(self) -> None:
        """Release the other ranks from `follow_leader` (an empty message means stop)."""
        self.group.broadcast_bytes(b"")


def follow_leader(group: ParallelGroup, denoiser) -> None:
    """Non-leader ranks: run every job rank 0 broadcasts, until it says stop."""
    sharding = GroupSharding(group)
    while True:
        blob = group.broadcast_bytes(None)
        if not blob:
            return
        job, flags = decode_job(blob)
        hooks = StepHooks(
            on_model_output=_ignore if flags.get("capture") == "1" else None,
            on_step=_fault_injector(group.rank),
        )
        try:
            denoiser.run(job, hooks, sharding)
        except Cancelled:
            continue


def _ignore(*_args) -> None:
    """Non-leader ranks join the gathers that capturing outputs needs, and drop the result."""


def _fault_injector(rank: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, fault_step, mode = spec.split(":")
    if int(fault_rank) != rank:
        return None

    def inject(done: int, total: int) -> None:
        if done == int(fault_step):
            if mode == "hang":
                time.sleep(10**6)
            os._exit(3)

    return inject
