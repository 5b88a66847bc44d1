"""DenoiserService: hosts the denoise stage behind a bounded queue; progress per step, cancellation and
deadlines stop the loop before its next step.

`make_engine` is the one place that decides what runs a job: the stage itself in this process (P x C = 1), or
rank 0's handle on a sequence-/CFG-parallel group (started by torchrun, or spawned here), both with the same
`run(job, hooks) -> latents`. Under torchrun the other ranks never open a port: `follow` runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal

import grpc

from common.cache import RedisStore
from common.denoise import DenoiseJob, StepHooks
from common.errors import InvalidArgument
from common.parallel.group import GroupError
from common.parallel.launch import follow_as_rank, group_denoiser, launched_by_torchrun
from common.serving.config import redis_password
from common.serving.convert import grids_from_proto, resolved_from_proto
from common.serving.embeddings import load_embeddings
from common.serving.handlers import in_executor, require_ready, rpc
from common.serving.hosting import LOAD_LOCK, HostedModel, compute_thread
from common.serving.jobs import JobQueue
from common.serving.server import Service
from common.serving.status import RpcFailure
from common.wire import pack, unpack
from imagegen.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

SERVICE = "imagegen.v1.DenoiserService"
log = logging.getLogger(__name__)
LATENTS = "latents"


class GroupEngine:
    """Rank 0's group handle kept open for the service's life; a failed group takes the process down."""

    def __init__(self, args: argparse.Namespace, model: HostedModel) -> None:
        self._stack = contextlib.ExitStack()
        dtype = str(model.dtype).removeprefix("torch.")
        self._group = self._stack.enter_context(
            group_denoiser(
                args.model, args.sp, args.cfg_parallel, dtype, model.device, args.collective_timeout, args.torch_threads
            )
        )

    def run(self, job: DenoiseJob, hooks: StepHooks):
        try:
            return self._group.run(job, hooks)
        except GroupError as exc:
            # The other ranks are gone or stuck: no later job can succeed. Fail this one as retryable and stop
            # the process (draining the queue) so that its supervisor starts a fresh group.
            log.critical("denoiser group failed, shutting down: %s", exc)
            os.kill(os.getpid(), signal.SIGTERM)
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"denoiser group failed: {exc}") from exc

    def close(self) -> None:
        self._stack.close()


def make_engine(args: argparse.Namespace, model: HostedModel):
    """What runs denoise jobs: an object with `run(job: DenoiseJob, hooks: StepHooks) -> latents`."""
    if args.sp * (2 if args.cfg_parallel else 1) > 1 or launched_by_torchrun():
        with LOAD_LOCK:  # from_pretrained is not thread-safe (services/all_in_one loads stages in parallel)
            return GroupEngine(args, model)
    return model.load(model.family.denoiser)


def follow(args: argparse.Namespace) -> int:
    """A torchrun rank other than 0: load the transformer and run every job rank 0 broadcasts."""
    model = HostedModel.from_args(args)
    dtype = str(model.dtype).removeprefix("torch.")
    follow_as_rank(args.model, args.sp, args.cfg_parallel, dtype, model.device, args.collective_timeout)
    return 0


def _check_options(options, family: str) -> None:
    if options.family != family:
        raise InvalidArgument("options.family", f"this denoiser hosts {family}, not {options.family!r}")
    for name in ("width", "height"):
        value = getattr(options, name)
        if value < 16 or value % 16:
            raise InvalidArgument(f"options.{name}", f"must be a positive multiple of 16, got {value}")
    for name in ("steps", "num_images"):
        if getattr(options, name) < 1:
            raise InvalidArgument(f"options.{name}", "must be at least 1")


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServiceServicer):
    def __init__(self, args: argparse.Namespace, model: HostedModel) -> None:
        self.args = args
        self.model = model
        self.family = model.family.name
        self.queue: JobQueue | None = None
        self.store: RedisStore | None = None

    async def prepare(self) -> None:
        model = self.model
        loader = compute_thread("denoiser-load")
        try:
            self.engine = await in_executor(loader, make_engine, self.args, model)
        finally:
            loader.shutdown(wait=False)
        if self.args.redis_url:
            self.store = RedisStore(self.args.redis_url, self.args.cache_ttl, self.args.redis_timeout, redis_password())
        self.info = model.info(("transformer", "scheduler"), reads_cache=self.store is not None)
        self.queue = JobQueue(self.args.queue_size, "denoiser")

    async def close(self) -> None:
        if self.queue is not None:
            await asyncio.to_thread(self.queue.close)
        if getattr(self, "engine", None) is not None and hasattr(self.engine, "close"):
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
        ticket = self.queue.submit(functools.partial(self._run, job), context.time_remaining())
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

    async def _job(self, request: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
        options = resolved_from_proto(request.options)
        _check_options(options, self.family)
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
        return DenoiseJob(options, positive, negative, condition, shapes)


async def _none() -> None:
    return None


def _progress(stage: int, **fields) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(stage=stage, **fields))


def make_service(args: argparse.Namespace) -> Service:
    servicer = DenoiserServicer(args, HostedModel.from_args(args))  # a bad folder fails before the port opens
    return Service(
        name=SERVICE,
        register=lambda server: denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
    )
