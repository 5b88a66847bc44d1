"""The gateway's work for one request: validate it completely, then run encoder -> (VAE encode) -> denoiser ->
VAE decode, relaying progress.

Validation happens before any backend is called: every field through `resolve_for` with the configured
limits, input images by count, bytes, pixels and geometry (decoded here, so a decompression bomb or a corrupt
file is the caller's INVALID_ARGUMENT, never a backend's crash), and the response size.

Every stage call of one request draws on one `RetryBudget`: it waits for a ready stage and retries within the
request's deadline, so a stage restart costs the caller time, not a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import grpc

from imagegen.common.families.inputs import decode_inputs
from imagegen.common.images import check_decoded_bytes
from imagegen.common.lora.registry import check_lora_weights, with_lora_defaults
from imagegen.common.options import Limits, ResolvedOptions
from imagegen.common.pipeline import resolve_for
from imagegen.common.serving import metrics
from imagegen.common.serving.channels import call_with_retries
from imagegen.common.serving.convert import (
    format_name,
    lora_defaults,
    lora_weights,
    lora_weights_to_proto,
    request_options,
    resolved_to_proto,
)
from imagegen.common.serving.handlers import current_request_id
from imagegen.common.serving.retry import RetryBudget
from imagegen.common.serving.routes import Route, RouteTable
from imagegen.common.serving.status import EMBEDDINGS_MISSING, RpcFailure, parse_error
from imagegen.common.validation import check_image_blobs, check_output_format, check_response_size
from imagegen.v1 import common_pb2, denoiser_pb2, encoder_pb2, image_service_pb2, vae_pb2

log = logging.getLogger("imagegen.gateway")
Event = common_pb2.Progress | image_service_pb2.ImageResponse


@dataclass
class Job:
    """One validated request."""

    request_id: str
    route: Route
    resolved: ResolvedOptions
    images: Sequence[bytes]
    output_format: int
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale); the denoiser resolves the names


class Gateway:
    def __init__(self, routes: RouteTable, limits: Limits, max_decoded_bytes: int = 1 << 40) -> None:
        self.routes = routes
        self.limits = limits
        self.max_decoded_bytes = max_decoded_bytes  # all input images of a request, decoded, from their headers

    async def validate(self, request, images: Sequence[bytes], budget: RetryBudget) -> Job:
        fmt = format_name(request.output_format)
        route, family = await self.routes.get(request.model, budget)
        loras = tuple(lora_weights(request))
        check_lora_weights(loras)
        # The denoiser's adapters (its Describe) bring NAME.json defaults; names it lacks it refuses itself.
        served = {info.name: info for info in route.infos["denoiser"].loras} if "denoiser" in route.infos else {}
        options = with_lora_defaults(
            request_options(request), [lora_defaults(served[name]) for name, _ in loras if name in served]
        )
        pil_images = await asyncio.to_thread(self._decode, images, family) if images else []
        resolved = resolve_for(family, options, pil_images, self.limits, route.model_defaults)
        channels = family.defaults.output_channels
        check_output_format(fmt, channels, family.name)
        check_response_size(resolved.num_images, resolved.width, resolved.height, fmt, self.limits, channels)
        return Job(current_request_id(), route, resolved, images, request.output_format, loras)

    def _decode(self, images: Sequence[bytes], family) -> list:
        check_image_blobs(images, family.defaults, family.name, self.limits)  # count and bytes first
        check_decoded_bytes(list(images), self.max_decoded_bytes)  # from the headers, before any decoding
        return decode_inputs(images, family, self.limits)

    async def run(self, job: Job, budget: RetryBudget, progress: bool = True) -> AsyncIterator[Event]:
        """Progress messages, then the response. Without `progress` the denoiser sends no per-step events (a
        unary caller would drop them)."""
        yield self._progress(common_pb2.STAGE_ENCODING)
        inline = not job.route.denoiser_reads_cache
        prompt, negative, condition = await _all(
            self._encode(job, job.resolved.prompt, inline, budget),
            self._encode(job, job.resolved.negative_prompt, inline, budget),
            self._encode_condition(job, budget),
        )
        request = denoiser_pb2.DenoiseRequest(
            request_id=job.request_id,
            options=resolved_to_proto(job.resolved),
            prompt_embeds=prompt,
            negative_embeds=negative,
            condition=condition,
            progress=progress,
            loras=lora_weights_to_proto(job.loras),
        )
        latents = None
        async for item in self._denoise_relayed(job, request, budget):
            if isinstance(item, bytes):
                latents = item
            else:
                yield item
        if latents is None:
            raise RpcFailure(grpc.StatusCode.INTERNAL, "denoiser: stream ended without latents")
        del request  # its embeddings are no longer needed while the images are decoded
        yield self._progress(common_pb2.STAGE_DECODING)
        decode = vae_pb2.DecodeRequest(
            request_id=job.request_id,
            latents=latents,
            width=job.resolved.width,
            height=job.resolved.height,
            output_format=job.output_format,
        )
        del latents
        decoded = await self._call(job.route.vae.Decode, decode, "vae", budget)
        del decode
        response = image_service_pb2.ImageResponse(
            request_id=job.request_id, model=job.route.name, seed=job.resolved.seed
        )
        response.images.extend(decoded.images)
        del decoded  # one copy of the images from here on
        yield response

    @staticmethod
    def _progress(stage: int, **fields) -> common_pb2.Progress:
        return common_pb2.Progress(stage=stage, request_id=current_request_id(), **fields)

    @staticmethod
    async def _call(method, request, backend: str, budget: RetryBudget):
        try:
            return await call_with_retries(method, request, backend, budget)
        except grpc.aio.AioRpcError as error:
            raise budget.failure(error, f"{backend}: ") from error

    async def _encode(self, job: Job, prompt: str | None, inline: bool, budget: RetryBudget):
        if prompt is None:
            return None
        request = encoder_pb2.EncodeRequest(
            request_id=job.request_id,
            prompt=prompt,
            max_sequence_length=job.resolved.max_sequence_length,
            images=job.images,
            inline=inline,
        )
        return (await self._call(job.route.encoder.Encode, request, "encoder", budget)).embeddings

    async def _encode_condition(self, job: Job, budget: RetryBudget):
        if not job.images:
            return None
        request = vae_pb2.EncodeConditionRequest(request_id=job.request_id, images=job.images)
        return await self._call(job.route.vae.EncodeCondition, request, "vae", budget)

    async def _denoise_relayed(
        self, job: Job, request, budget: RetryBudget
    ) -> AsyncIterator[common_pb2.Progress | bytes]:
        """The denoiser's events; when its cache lost the embeddings (eviction, Redis restart), once more with
        them inline. Failures keep the denoiser's status and details."""
        try:
            async for item in self._denoise(job.route, request, budget):
                yield item
            return
        except grpc.aio.AioRpcError as error:
            if parse_error(error).reason != EMBEDDINGS_MISSING:
                raise budget.failure(error, "denoiser: ") from error
        metrics.EMBEDDING_REFETCHES.inc()
        log.warning("embeddings missing at the denoiser; re-encoding inline")
        prompt, negative = await _all(
            self._encode(job, job.resolved.prompt, True, budget),
            self._encode(job, job.resolved.negative_prompt, True, budget),
        )
        request.prompt_embeds.CopyFrom(prompt)
        if negative is not None:
            request.negative_embeds.CopyFrom(negative)
        try:
            async for item in self._denoise(job.route, request, budget):
                yield item
        except grpc.aio.AioRpcError as error:
            raise budget.failure(error, "denoiser: ") from error

    @staticmethod
    async def _denoise(route: Route, request, budget: RetryBudget) -> AsyncIterator[common_pb2.Progress | bytes]:
        """Relay the denoiser's stream, waiting for a ready denoiser and retrying while the budget allows. A
        job is a pure function of its request, so it is retried even after progress was relayed (a streaming
        caller then sees the steps start again)."""
        while True:
            call = route.denoiser.Denoise(request, timeout=budget.deadline.remaining(), wait_for_ready=True)
            try:
                latents = None
                async for event in call:
                    if event.HasField("latents"):
                        latents = event.latents  # the stream ends next: read its status instead of cancelling it
                        continue
                    progress = event.progress
                    progress.request_id = request.request_id
                    yield progress
                if latents is not None:
                    yield latents
                return
            except grpc.aio.AioRpcError as error:
                delay = budget.delay(error)
                if delay is None:
                    raise
                metrics.BACKEND_RETRIES.labels("denoiser").inc()
                await asyncio.sleep(delay)
            finally:
                call.cancel()  # a cancelled client (or deadline) stops the denoiser's loop within one step


async def _all(*awaitables: Awaitable) -> list:
    """`gather`, but a failure (or our cancellation) cancels the siblings instead of leaving them running."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
