"""What runs the denoiser's jobs, decided once: the stage itself in this process (P x C = 1), or rank 0's handle
on a sequence-/CFG-parallel group (started by torchrun, or spawned here), both with the same
`run_batch(jobs, hooks) -> [latents or exception]`. Also the fast path's warm-up before SERVING and the torchrun
follower ranks, which never open a port. Every rank is built from the one `GroupSpec` in `DenoiserConfig`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Callable

import grpc

from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.parallel.group import GroupError
from imagegen.common.parallel.launch import follow_as_rank, group_denoiser, launched_by_torchrun
from imagegen.common.parallel.runner import heartbeat_interval
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.serving.hosting import LOAD_LOCK, HostedModel
from imagegen.common.serving.status import GROUP_FAILED, with_reason
from imagegen.common.warmup import parse_sizes, warm_up
from imagegen.services.denoiser_config import DenoiserConfig

log = logging.getLogger(__name__)


class GroupEngine:
    """Rank 0's group handle kept open for the service's life. `on_failure(reason)` hears, once, that the group
    broke; every later job fails at once (the process is on its way out)."""

    def __init__(self, spec: GroupSpec) -> None:
        self._stack = contextlib.ExitStack()
        self._group = self._stack.enter_context(group_denoiser(spec))
        self.stage = self._group.denoiser
        self.heartbeat_s = heartbeat_interval(spec.timeout_s)
        self.on_failure: Callable[[str], None] = lambda reason: None

    def run(self, job: DenoiseJob, hooks: StepHooks):
        try:
            return self._group.run(job, hooks)
        except GroupError as exc:
            raise self._failed(exc) from exc

    def run_batch(self, jobs: list[DenoiseJob], hooks: list[StepHooks]) -> list:
        try:
            return self._group.run_batch(jobs, hooks)
        except GroupError as exc:
            raise self._failed(exc) from exc

    def heartbeat(self) -> None:
        try:
            self._group.heartbeat()
        except GroupError as exc:
            self._failed(exc)

    def finish(self) -> None:
        """Release the other ranks (on the queue's thread, after the last job)."""
        try:
            self._group.close()
        except GroupError as exc:
            self._failed(exc)

    def _failed(self, exc: GroupError):
        # The other ranks are gone or stuck: no later job can succeed. Callers get UNAVAILABLE (retried by the
        # gateway elsewhere, or once this replica has restarted).
        self.on_failure(str(exc))
        return with_reason(grpc.StatusCode.UNAVAILABLE, GROUP_FAILED, f"denoiser group failed: {exc}")

    def close(self) -> None:
        self._stack.close()


class LocalEngine:
    """The stage in this process, behind the same interface as `GroupEngine`."""

    def __init__(self, stage) -> None:
        self.stage = stage

    def run(self, job: DenoiseJob, hooks: StepHooks):
        return self.stage.run(job, hooks)

    def run_batch(self, jobs: list[DenoiseJob], hooks: list[StepHooks]) -> list:
        return self.stage.run_batch(jobs, hooks)

    def close(self) -> None:
        pass


Engine = GroupEngine | LocalEngine


def make_engine(config: DenoiserConfig, model: HostedModel) -> Engine:
    if config.grouped or launched_by_torchrun():
        with LOAD_LOCK:  # from_pretrained is not thread-safe (services/all_in_one loads stages in parallel)
            return GroupEngine(config.group)
    return LocalEngine(model.load(functools.partial(model.family.denoiser, settings=config.stage)))


def prepare_engine(config: DenoiserConfig, model: HostedModel, stage=None) -> Engine:
    """Load (unless `stage` is given: benchmarks host full-size random-weight stages), then warm the fast path
    up for `--warmup-sizes` (and batches, with batching on) before the service reports SERVING."""
    engine = LocalEngine(stage) if stage is not None else make_engine(config, model)
    if engine.stage.kernels == "fast" and str(model.device).startswith("cuda"):
        sizes = parse_sizes(config.warmup_sizes, model.family)
        transformer_config = dict(engine.stage.dit.transformer.config)  # the loaded model's, not the folder's
        warm_up(engine, model.family, transformer_config, sizes, config.max_batch)
    return engine


def follow(config: DenoiserConfig) -> int:
    """A torchrun rank other than 0: load the transformer and run every job rank 0 broadcasts.

    torchrun forwards SIGTERM to every rank; this one keeps following until rank 0, done draining, broadcasts
    stop (or dies: then the next collective fails and this process exits non-zero)."""
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: following rank 0 until it stops the group"))
    follow_as_rank(config.group)
    return 0
