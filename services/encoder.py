"""EncoderService: prompts (and edit images) -> embeddings, cached under content keys (Redis or an LRU).

Its requests are checked as the gateway checks them (prompt length, sequence length, images: count, bytes,
formats, pixels, geometry), and an encode nobody waits for any more is dropped before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from imagegen.common.cache import EmbeddingKey, LruBytes, RedisStore, image_digests
from imagegen.common.families.inputs import decode_inputs
from imagegen.common.options import check_int, check_text
from imagegen.common.serving import metrics
from imagegen.common.serving.config import limits_from_args, redis_password
from imagegen.common.serving.embeddings import TENSOR_NAME, EmbeddingCache
from imagegen.common.serving.handlers import in_executor, require_ready, rpc
from imagegen.common.serving.hosting import ComputeThread, HostedModel
from imagegen.common.serving.server import Service
from imagegen.common.validation import check_image_blobs
from imagegen.common.wire import pack
from imagegen.v1 import encoder_pb2, encoder_pb2_grpc

SERVICE = "imagegen.v1.EncoderService"


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, args: argparse.Namespace, model: HostedModel) -> None:
        self.args = args
        self.model = model
        self.limits = limits_from_args(args)
        self.executor = ComputeThread("encoder")
        self.stage = None
        self.cache: EmbeddingCache | None = None

    async def prepare(self) -> None:
        self.stage = await in_executor(self.executor, self.model.load, self.model.family.text_encoder)
        self.info = self.model.info(self.model.family.text_components)
        store = None
        if self.args.redis_url:
            store = RedisStore(self.args.redis_url, self.args.cache_ttl, self.args.redis_timeout, redis_password())
        self.cache = EmbeddingCache(store, LruBytes(self.args.cache_bytes))

    async def close(self) -> None:
        if self.cache is not None and self.cache.store is not None:
            await self.cache.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @rpc(SERVICE)
    async def Describe(self, request, context):
        require_ready(self.cache is not None, "encoder")
        return self.info

    @rpc(SERVICE)
    async def Encode(self, request: encoder_pb2.EncodeRequest, context) -> encoder_pb2.EncodeResponse:
        require_ready(self.cache is not None, "encoder")
        family = self.model.family
        check_text("prompt", request.prompt, self.limits)
        check_int("max_sequence_length", request.max_sequence_length, 1, family.defaults.max_sequence_length_limit)
        check_image_blobs(request.images, family.defaults, family.name, self.limits)
        digests = await asyncio.to_thread(image_digests, request.images)  # hashing MBs: off the loop
        key = EmbeddingKey(
            model_id=self.info.model_id,
            revision=self.info.revision,
            template_version=self.info.template_version,
            dtype=self.info.dtype,
            device_type=self.model.device_type,
            prompt=request.prompt,
            max_sequence_length=request.max_sequence_length,
            image_digests=digests,
        )

        async def compute(abandoned: Callable[[], bool]) -> bytes:
            return await in_executor(self.executor, self._encode, request, abandoned, unwanted=abandoned)

        embeddings, hit = await self.cache.get_or_compute(str(key), request.inline, compute)
        return encoder_pb2.EncodeResponse(embeddings=embeddings, cache_hit=hit)

    def _encode(self, request: encoder_pb2.EncodeRequest, abandoned: Callable[[], bool]) -> bytes:
        family = self.model.family
        images = decode_inputs(request.images, family, self.limits, abandoned) if request.images else []
        start = time.monotonic()
        metrics.TEXT_ENCODER_CALLS.inc()
        embeds = self.stage.encode(request.prompt, images, request.max_sequence_length)
        metrics.STAGE_SECONDS.labels("encode").observe(time.monotonic() - start)
        return pack(embeds, TENSOR_NAME)


def make_service(args: argparse.Namespace) -> Service:
    servicer = EncoderServicer(args, HostedModel.from_args(args))  # a bad folder fails before the port opens
    return Service(
        name=SERVICE,
        register=lambda server: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
        max_receive_bytes=args.max_message_bytes,
    )
