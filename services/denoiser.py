"""DenoiserService: hosts the denoise stage behind a bounded queue; progress per step, cancellation and
deadlines stop the loop before its next step.

What runs the jobs (this process's stage, or rank 0 of a group, and the torchrun followers) is
`imagegen.services.denoiser_engine`'s; the configuration is one `DenoiserConfig`, built from the flags.

Every job is validated here, against the loaded model, before it is queued (and so before rank 0 broadcasts
it): a malformed request is the caller's INVALID_ARGUMENT and never reaches the other ranks. A group that fails
(a rank died or hung) makes this process report NOT_SERVING and exit non-zero; its callers get UNAVAILABLE,
which the gateway retries on a fresh group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from imagegen.common.batching import batch_key
from imagegen.common.cache import RedisStore
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families.inputs import denoiser_inputs
from imagegen.common.lora import LoraRegistry
from imagegen.common.lora.registry import check_lora_weights
from imagegen.common.serving.convert import (
    grids_from_proto,
    lora_info,
    lora_weights,
    model_defaults_to_proto,
    resolved_from_proto,
)
from imagegen.common.serving.embeddings import load_embeddings
from imagegen.common.serving.handlers import in_executor, require_ready, rpc
from imagegen.common.serving.hosting import ComputeThread, HostedModel
from imagegen.common.serving.jobs import Batching, JobQueue
from imagegen.common.serving.server import Service
from imagegen.common.serving.status import GROUP_FAILED, with_reason
from imagegen.common.validation import check_condition, check_embeddings, check_lora_fit, check_resolved
from imagegen.common.wire import LATENTS, pack, unpack
from imagegen.services.denoiser_config import DenoiserConfig
from imagegen.services.denoiser_engine import Engine, GroupEngine, prepare_engine
from imagegen.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

SERVICE = "imagegen.v1.DenoiserService"
log = logging.getLogger(__name__)


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServiceServicer):
    """`stage`: an already built stage to host (benchmarks); None: the engine loads it from the model folder."""

    def __init__(self, config: DenoiserConfig, model: HostedModel, stage=None) -> None:
        self.config = config
        self.model = model
        self._prebuilt = stage
        self.family = model.family.name
        self.loras = LoraRegistry(config.lora_dir)  # a bad --lora-dir fails before the port opens
        self.engine: Engine | None = None
        self.queue: JobQueue | None = None
        self.store: RedisStore | None = None
        self.info: common_pb2.ModelInfo | None = None
        self.service: Service | None = None

    async def prepare(self) -> None:
        config, model = self.config, self.model
        loader = ComputeThread("denoiser-load")
        try:
            engine = await in_executor(loader, prepare_engine, config, model, self._prebuilt)
        finally:
            loader.shutdown(wait=False)
        if config.redis is not None:
            redis = config.redis
            self.store = RedisStore(redis.url, redis.ttl_s, redis.timeout_s, redis.password)
        info = model.info(("transformer", "scheduler"), reads_cache=self.store is not None)
        info.loras.extend(lora_info(name, self.loras.defaults(name)) for name in self.loras.names())
        info.defaults.CopyFrom(model_defaults_to_proto(config.model_defaults))
        self.info = info
        self.engine = engine
        idle, finish, wait_s = None, None, config.batch_wait_s
        if isinstance(engine, GroupEngine):
            engine.on_failure = self._group_failed
            idle, finish = (engine.heartbeat_s, engine.heartbeat), engine.finish
            wait_s = min(wait_s, engine.heartbeat_s)  # no heartbeat goes out while the worker waits for a batch
        if config.max_batch > 1:
            log.info("denoiser batches up to %d jobs, waiting at most %.1f ms", config.max_batch, wait_s * 1000)
        batching = Batching(config.max_batch, wait_s)
        self.queue = JobQueue(config.queue_size, self._run_batch, "denoiser", batching, idle=idle, finish=finish)

    def _group_failed(self, reason: str) -> None:
        """From the queue's thread: fail the waiting jobs at once and take the process down (exit status 1)."""
        if self.queue is not None:
            self.queue.shut(with_reason(grpc.StatusCode.UNAVAILABLE, GROUP_FAILED, "denoiser group failed"))
        if self.service is not None:
            self.service.fail(reason)

    async def close(self) -> None:
        finished = True
        if self.queue is not None:
            # The drain let in-flight jobs finish; what still runs was cancelled and stops within a step.
            finished = await asyncio.to_thread(self.queue.close, self.config.group.timeout_s)
        if not finished:  # its thread still holds the group: tearing it down here would race its collectives
            log.error("the denoiser queue did not stop; exiting without releasing the group")
        elif self.engine is not None:
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
        timeout = self.config.default_timeout_s if remaining is None else remaining
        ticket = self.queue.submit(job, timeout, key=batch_key(job))
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

    def _run_batch(self, jobs: list[DenoiseJob], hooks: list[StepHooks]) -> list:
        """Jobs of one batch key (or one alone) in one forward per step; each member's latents packed, or its
        exception."""
        results = self.engine.run_batch(jobs, hooks)
        return [r if isinstance(r, BaseException) else pack(r, LATENTS) for r in results]

    async def _job(self, request: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
        """The request as a job, every part checked against the options, the limits and the loaded model."""
        options = resolved_from_proto(request.options)
        check_resolved(options, self.family, self.model.family.defaults, self.config.limits)
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
        stage = self.engine.stage
        check_lora_fit(stage, job.loras, [Path(path).stem for path, _ in job.loras])
        inputs = denoiser_inputs(self.model.family, stage, job)
        check_condition(job.condition_latents, job.condition_shapes, job.options, inputs, self.config.limits)
        check_embeddings(job.prompt_embeds, "prompt_embeds", "prompt", inputs)
        if job.negative_embeds is not None:
            check_embeddings(job.negative_embeds, "negative_embeds", "negative_prompt", inputs)


async def _none() -> None:
    return None


def _progress(stage: int, **fields) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(stage=stage, **fields))


def make_service(args: argparse.Namespace) -> Service:
    model = HostedModel.from_args(args)  # a bad folder or defaults file fails before the port opens
    servicer = DenoiserServicer(DenoiserConfig.from_flags(args, model), model)
    servicer.service = Service(
        name=SERVICE,
        register=lambda server: denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
        max_receive_bytes=args.max_message_bytes,
    )
    return servicer.service
