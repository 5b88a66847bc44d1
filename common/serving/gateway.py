"""The gateway's work for one request: validate it completely, then run encoder -> (VAE encode) -> denoiser ->
VAE decode, relaying progress.

Validation happens before any backend is called: every field through `resolve_for` with the configured
limits, input images by count, bytes and pixels (decoded here, so a decompression bomb or a corrupt file is
the caller's INVALID_ARGUMENT, never a backend's crash).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import grpc
import PIL.Image

from common.errors import InvalidArgument
from common.images import decode_image
from common.options import Limits, ResolvedOptions
from common.pipeline import resolve_for
from common.serving import metrics
from common.serving.channels import Deadline, RetryPolicy, call_with_retries
from common.serving.convert import format_name, request_options, resolved_to_proto
from common.serving.handlers import current_request_id
from common.serving.routes import Route, RouteTable
from common.serving.status import EMBEDDINGS_MISSING, RpcFailure, parse_error, relay
from imagegen.v1 import common_pb2, denoiser_pb2, encoder_pb2, image_service_pb2, vae_pb2

log = logging.getLogger("imagegen.gateway")
Event = common_pb2.Progress | image_service_pb2.ImageResponse


@dataclass(frozen=True)
class GatewayLimits:
    options: Limits = Limits()
    max_input_bytes: int = 32 << 20
    max_input_pixels: int = 64 << 20

    @property
    def max_images(self) -> int:
        return self.options.max_images_per_request


def decode_inputs(images: Sequence[bytes], limits: GatewayLimits) -> list[PIL.Image.Image]:
    if len(images) > limits.max_images:
        raise InvalidArgument("images", f"at most {limits.max_images} input images, got {len(images)}")
    for index, data in enumerate(images):
        if len(data) > limits.max_input_bytes:
            raise InvalidArgument(f"images[{index}]", f"is {len(data)} bytes; the limit is {limits.max_input_bytes}")
    return [decode_image(data, f"images[{i}]", limits.max_input_pixels) for i, data in enumerate(images)]


@dataclass
class Job:
    """One validated request."""

    request_id: str
    route: Route
    resolved: ResolvedOptions
    images: list[bytes]
    output_format: int


class Gateway:
    def __init__(self, routes: RouteTable, limits: GatewayLimits, policy: RetryPolicy = RetryPolicy()) -> None:
        self.routes = routes
        self.limits = limits
        self.policy = policy

    async def validate(self, request, images: Sequence[bytes]) -> Job:
        output_format = request.output_format
        format_name(output_format)
        route, family = await self.routes.get(request.model)
        options = request_options(request)
        pil_images = await asyncio.to_thread(decode_inputs, images, self.limits) if images else []
        resolved = resolve_for(family, options, pil_images, self.limits.options)
        return Job(current_request_id(), route, resolved, list(images), output_format)

    async def run(self, job: Job, deadline: Deadline, progress: bool = True) -> AsyncIterator[Event]:
        """Progress messages, then the response. Without `progress` the denoiser sends no per-step events (a
        unary caller would drop them)."""
        yield self._progress(common_pb2.STAGE_ENCODING)
        inline = not job.route.denoiser_reads_cache
        prompt, negative, condition = await _all(
            self._encode(job, job.resolved.prompt, inline, deadline),
            self._encode(job, job.resolved.negative_prompt, inline, deadline),
            self._encode_condition(job, deadline),
        )
        request = denoiser_pb2.DenoiseRequest(
            request_id=job.request_id,
            options=resolved_to_proto(job.resolved),
            prompt_embeds=prompt,
            negative_embeds=negative,
            condition=condition,
            progress=progress,
        )
        latents = None
        async for item in self._denoise_relayed(job, request, deadline):
            if isinstance(item, bytes):
                latents = item
            else:
                yield item
        if latents is None:
            raise RpcFailure(grpc.StatusCode.INTERNAL, "denoiser: stream ended without latents")
        yield self._progress(common_pb2.STAGE_DECODING)
        decoded = await self._call(
            job.route.vae.Decode,
            vae_pb2.DecodeRequest(
                request_id=job.request_id,
                latents=latents,
                width=job.resolved.width,
                height=job.resolved.height,
                output_format=job.output_format,
            ),
            "vae",
            deadline,
        )
        yield image_service_pb2.ImageResponse(
            request_id=job.request_id, model=job.route.name, seed=job.resolved.seed, images=decoded.images
        )

    @staticmethod
    def _progress(stage: int, **fields) -> common_pb2.Progress:
        return common_pb2.Progress(stage=stage, request_id=current_request_id(), **fields)

    async def _call(self, method, request, backend: str, deadline: Deadline):
        try:
            return await call_with_retries(method, request, backend, deadline, self.policy)
        except grpc.aio.AioRpcError as error:
            raise relay(error, f"{backend}: ") from error

    async def _encode(self, job: Job, prompt: str | None, inline: bool, deadline: Deadline):
        if prompt is None:
            return None
        request = encoder_pb2.EncodeRequest(
            request_id=job.request_id,
            prompt=prompt,
            max_sequence_length=job.resolved.max_sequence_length,
            images=job.images,
            inline=inline,
        )
        return (await self._call(job.route.encoder.Encode, request, "encoder", deadline)).embeddings

    async def _encode_condition(self, job: Job, deadline: Deadline):
        if not job.images:
            return None
        request = vae_pb2.EncodeConditionRequest(request_id=job.request_id, images=job.images)
        return await self._call(job.route.vae.EncodeCondition, request, "vae", deadline)

    async def _denoise_relayed(
        self, job: Job, request, deadline: Deadline
    ) -> AsyncIterator[common_pb2.Progress | bytes]:
        """The denoiser's events; when its cache lost the embeddings (eviction, Redis restart), once more with
        them inline. Failures keep the denoiser's status and details."""
        try:
            async for item in self._denoise(job.route, request, deadline):
                yield item
            return
        except grpc.aio.AioRpcError as error:
            if parse_error(error).reason != EMBEDDINGS_MISSING:
                raise relay(error, "denoiser: ") from error
        metrics.EMBEDDING_REFETCHES.inc()
        log.warning("embeddings missing at the denoiser; re-encoding inline")
        prompt, negative = await _all(
            self._encode(job, job.resolved.prompt, True, deadline),
            self._encode(job, job.resolved.negative_prompt, True, deadline),
        )
        request.prompt_embeds.CopyFrom(prompt)
        if negative is not None:
            request.negative_embeds.CopyFrom(negative)
        try:
            async for item in self._denoise(job.route, request, deadline):
                yield item
        except grpc.aio.AioRpcError as error:
            raise relay(error, "denoiser: ") from error

    async def _denoise(self, route: Route, request, deadline: Deadline) -> AsyncIterator[common_pb2.Progress | bytes]:
        """Relay the denoiser's stream; retried on UNAVAILABLE only while it has sent nothing."""
        attempt = 0
        while True:
            call = route.denoiser.Denoise(request, timeout=deadline.remaining())
            received = False
            try:
                async for event in call:
                    received = True
                    if event.HasField("latents"):
                        yield event.latents
                        return
                    progress = event.progress
                    progress.request_id = request.request_id
                    yield progress
                return
            except grpc.aio.AioRpcError as error:
                delay = None if received else self.policy.should_retry(error, attempt, deadline)
                if delay is None:
                    raise
                metrics.BACKEND_RETRIES.labels("denoiser").inc()
                await asyncio.sleep(delay)
                attempt += 1
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
