"""DenoiserService: hosts the denoise stage behind a bounded queue; progress per step, cancellation and
deadlines stop the loop before its next step.

`make_engine` is the one place that decides what runs a job: the stage itself in this process (P x C = 1), or
rank 0's handle on a sequence-/CFG-parallel group (started by torchrun, or spawned here), both with the same
`run(job, hooks) -> latents`. Under torchrun the other ranks never open a port: `follow` runs them.

Every job is validated here, against the loaded model, before it is queued (and so before rank 0 broadcasts
it): a malformed request is the caller's INVALID_ARGUMENT and never reaches the other ranks. A group that fails
(a rank died or hung) makes this process report NOT_SERVING and exit non-zero; its callers get UNAVAILABLE,
which the gateway retries on a fresh group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import grpc

from imagegen.common.batching import batch_key
from imagegen.common.cache import RedisStore
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families.inputs import denoiser_inputs
from imagegen.common.lora import LoraRegistry
from imagegen.common.lora.registry import CACHE_ENV, check_lora_weights
from imagegen.common.parallel.group import GroupError
from imagegen.common.parallel.launch import follow_as_rank, group_denoiser, launched_by_torchrun
from imagegen.common.parallel.runner import heartbeat_interval
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.serving.config import redis_password
from imagegen.common.serving.convert import grids_from_proto, lora_info, lora_weights, resolved_from_proto
from imagegen.common.serving.embeddings import load_embeddings
from imagegen.common.serving.handlers import in_executor, require_ready, rpc
from imagegen.common.serving.hosting import LOAD_LOCK, HostedModel, compute_thread
from imagegen.common.serving.jobs import Batching, JobQueue
from imagegen.common.serving.server import Service
from imagegen.common.serving.status import GROUP_FAILED, with_reason
from imagegen.common.validation import (
    check_condition,
    check_embeddings,
    check_lora_fit,
    check_resolved,
    limits_from_args,
)
from imagegen.common.warmup import parse_sizes, warm_up
from imagegen.common.wire import LATENTS, pack, unpack
from imagegen.services.flags import BATCH_WAIT_MS, CUDA_MAX_BATCH
from imagegen.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

SERVICE = "imagegen.v1.DenoiserService"
log = logging.getLogger(__name__)


def max_batch(args: argparse.Namespace, device) -> int:
    """`--max-batch`, else 1 on the CPU (a forward there is compute-bound already) and `CUDA_MAX_BATCH` (also 1,
    measured) on a GPU."""
    chosen = getattr(args, "max_batch", None)
    if chosen:
        return chosen
    return CUDA_MAX_BATCH if str(device).startswith("cuda") else 1


class GroupEngine:
    """Rank 0's group handle kept open for the service's life. `on_failure(reason)` hears, once, that the group
    broke; every later job fails at once (the process is on its way out)."""

    def __init__(self, args: argparse.Namespace, model: HostedModel) -> None:
        self._stack = contextlib.ExitStack()
        self._group = self._stack.enter_context(group_denoiser(group_spec(args, model)))
        self.stage = self._group.denoiser
        self.heartbeat_s = heartbeat_interval(args.collective_timeout)
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


def group_spec(args: argparse.Namespace, model: HostedModel) -> GroupSpec:
    """The one spec of this service's group: rank 0 (`GroupEngine`) and torchrun's other ranks (`follow`)."""
    return GroupSpec.from_flags(args, args.model, str(model.dtype), model.device)


def make_engine(args: argparse.Namespace, model: HostedModel):
    """What runs denoise jobs: an object with `run(job: DenoiseJob, hooks: StepHooks) -> latents` and
    `run_batch(jobs, hooks) -> [latents or exception]` (`imagegen.common.batching`)."""
    if args.sp * (2 if args.cfg_parallel else 1) > 1 or launched_by_torchrun():
        with LOAD_LOCK:  # from_pretrained is not thread-safe (services/all_in_one loads stages in parallel)
            return GroupEngine(args, model)
    return model.load(functools.partial(model.family.denoiser, kernels=args.kernels, compile=args.compile))


def export_kernel_choice(args: argparse.Namespace) -> None:
    """Ranks started by this process (a spawned group) read the kernel path from the environment."""
    choices = [("IMAGEGEN_KERNELS", args.kernels), ("IMAGEGEN_COMPILE", args.compile)]
    choices.append((CACHE_ENV, getattr(args, "lora_cache_mb", None)))  # every rank's adapter cache bound
    for env, value in choices:
        if value:
            os.environ[env] = str(value)


def prepare_engine(args: argparse.Namespace, model: HostedModel, engine=None):
    """Load (unless `engine` is given: benchmarks host full-size random-weight stages), then warm the fast
    path up for `--warmup-sizes` (and batches, with batching on) before the service reports SERVING."""
    export_kernel_choice(args)
    engine = engine if engine is not None else make_engine(args, model)
    stage = getattr(engine, "stage", engine)
    if getattr(stage, "kernels", "reference") == "fast" and str(model.device).startswith("cuda"):
        sizes = parse_sizes(args.warmup_sizes, model.family)
        config = dict(stage.dit.transformer.config)  # the loaded (or given) model's, not the folder's
        warm_up(engine, model.family, config, sizes, max_batch(args, model.device))
    return engine


def follow(args: argparse.Namespace) -> int:
    """A torchrun rank other than 0: load the transformer and run every job rank 0 broadcasts.

    torchrun forwards SIGTERM to every rank; this one keeps following until rank 0, done draining, broadcasts
    stop (or dies: then the next collective fails and this process exits non-zero)."""
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: following rank 0 until it stops the group"))
    export_kernel_choice(args)
    follow_as_rank(group_spec(args, HostedModel.from_args(args)))
    return 0


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServiceServicer):
    def __init__(self, args: argparse.Namespace, model: HostedModel, engine=None) -> None:
        self.args = args
        self.model = model
        self._prebuilt = engine  # an already built engine (benchmarks); None: loaded from the model folder
        self.family = model.family.name
        self.limits = limits_from_args(args)
        self.loras = LoraRegistry(getattr(args, "lora_dir", None))  # a bad --lora-dir fails before the port opens
        self.queue: JobQueue | None = None
        self.store: RedisStore | None = None
        self.service: Service | None = None

    async def prepare(self) -> None:
        model = self.model
        loader = compute_thread("denoiser-load")
        try:
            self.engine = await in_executor(loader, prepare_engine, self.args, model, self._prebuilt)
        finally:
            loader.shutdown(wait=False)
        self.stage = getattr(self.engine, "stage", self.engine)
        if self.args.redis_url:
            self.store = RedisStore(self.args.redis_url, self.args.cache_ttl, self.args.redis_timeout, redis_password())
        self.info = model.info(("transformer", "scheduler"), reads_cache=self.store is not None)
        self.info.loras.extend(lora_info(name, self.loras.defaults(name)) for name in self.loras.names())
        batching = self._batching()
        if isinstance(self.engine, GroupEngine):
            self.engine.on_failure = self._group_failed
            idle = (self.engine.heartbeat_s, self.engine.heartbeat)
            self.queue = JobQueue(
                self.args.queue_size, "denoiser", idle=idle, finish=self.engine.finish, batching=batching
            )
        else:
            self.queue = JobQueue(self.args.queue_size, "denoiser", batching=batching)

    def _batching(self) -> Batching | None:
        """`--max-batch` (default by device) and `--batch-wait-ms`; None where jobs run one at a time."""
        size = max_batch(self.args, self.model.device)
        if size <= 1:
            return None
        wait_s = getattr(self.args, "batch_wait_ms", BATCH_WAIT_MS) / 1000
        if isinstance(self.engine, GroupEngine):  # no heartbeat goes out while the worker waits for a batch
            wait_s = min(wait_s, self.engine.heartbeat_s)
        log.info("denoiser batches up to %d jobs, waiting at most %.1f ms for them", size, wait_s * 1000)
        return Batching(size, wait_s, self._run_batch)

    def _group_failed(self, reason: str) -> None:
        """From the queue's thread: fail the waiting jobs at once and take the process down (exit status 1)."""
        self.queue.shut(with_reason(grpc.StatusCode.UNAVAILABLE, GROUP_FAILED, "denoiser group failed"))
        if self.service is not None:
            self.service.fail(reason)

    async def close(self) -> None:
        finished = True
        if self.queue is not None:
            # The drain let in-flight jobs finish; what still runs was cancelled and stops within a step.
            finished = await asyncio.to_thread(self.queue.close, self.args.collective_timeout)
        if not finished:  # its thread still holds the group: tearing it down here would race its collectives
            log.error("the denoiser queue did not stop; exiting without releasing the group")
        elif getattr(self, "engine", None) is not None and hasattr(self.engine, "close"):
            await asyncio.to_thread(self.engine.close)
        if self.store is not None:
            await self.store.close()

    @rpc(SERVICE)
    async def Describe(self, request, context):
        require_ready(self.queue is not None, "denoiser")
        return self.info

    @rpc(SERVICE)
    async def Denoise(self, request: denoiser_pb2.DenoiseRequest, context):
        require_ready(self.queue is not None, "denoiser")
        job = await self._job(request)
        total = job.options.steps
        remaining = context.time_remaining()
        timeout = self.args.default_timeout if remaining is None else remaining
        ticket = self.queue.submit(functools.partial(self._run, job), timeout, payload=job, key=batch_key(job))
        try:
            async for event in ticket.events():
                if not request.progress and not event.final:
                    continue
                if event.kind == "queued":
                    yield _progress(common_pb2.STAGE_QUEUED, queue_position=event.position, total_steps=total)
                elif event.kind in ("started", "step"):
                    yield _progress(common_pb2.STAGE_DENOISING, step=event.step, total_steps=total)
                elif event.kind == "done":
                    yield denoiser_pb2.DenoiseEvent(latents=event.result)
                else:
                    raise event.error
        finally:
            self.queue.withdraw(ticket)  # no-op once finished; frees the worker if the caller went away

    def _run(self, job: DenoiseJob, hooks: StepHooks) -> bytes:
        return pack(self.engine.run(job, hooks), LATENTS)

    def _run_batch(self, jobs: list[DenoiseJob], hooks: list[StepHooks]) -> list:
        """Jobs of one batch key in one forward per step; each member's latents packed, or its exception."""
        results = self.engine.run_batch(jobs, hooks)
        return [r if isinstance(r, BaseException) else pack(r, LATENTS) for r in results]

    async def _job(self, request: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
        """The request as a job, every part checked against the options, the limits and the loaded model."""
        options = resolved_from_proto(request.options)
        check_resolved(options, self.family, self.model.family.defaults, self.limits)
        weights = lora_weights(request)
        check_lora_weights(weights)
        loras = tuple(
            (str(self.loras.path(name, f"loras[{i}].name")), float(scale)) for i, (name, scale) in enumerate(weights)
        )
        if options.uses_cfg and not request.HasField("negative_embeds"):
            raise InvalidArgument("negative_embeds", "required when options.negative_prompt is set (CFG)")
        positive, negative = await asyncio.gather(
            load_embeddings(request.prompt_embeds, self.store, "prompt_embeds"),
            load_embeddings(request.negative_embeds, self.store, "negative_embeds") if options.uses_cfg else _none(),
        )
        condition, shapes = None, []
        if request.HasField("condition"):
            condition = unpack(request.condition.safetensors, LATENTS, "condition.safetensors")
            shapes = grids_from_proto(request.condition.shapes)
        job = DenoiseJob(options, positive, negative, condition, shapes, loras)
        await asyncio.to_thread(self._check_job, job)  # scans every value: off the event loop
        return job

    def _check_job(self, job: DenoiseJob) -> None:
        # Loads the adapters into the stage's cache now, so a file that does not fit fails this request alone.
        check_lora_fit(self.stage, job.loras, [Path(path).stem for path, _ in job.loras])
        inputs = denoiser_inputs(self.model.family, self.stage, job)
        check_condition(job.condition_latents, job.condition_shapes, job.options, inputs, self.limits)
        check_embeddings(job.prompt_embeds, "prompt_embeds", "prompt", inputs)
        if job.negative_embeds is not None:
            check_embeddings(job.negative_embeds, "negative_embeds", "negative_prompt", inputs)


async def _none() -> None:
    return None


def _progress(stage: int, **fields) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(stage=stage, **fields))


def make_service(args: argparse.Namespace) -> Service:
    servicer = DenoiserServicer(args, HostedModel.from_args(args))  # a bad folder fails before the port opens
    servicer.service = Service(
        name=SERVICE,
        register=lambda server: denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
        max_receive_bytes=args.max_message_bytes,
    )
    return servicer.service
