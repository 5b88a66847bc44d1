"""VaeService: edit images -> condition latents; final latents -> images in the requested output format.

Its requests are checked as the gateway checks them: edit images by count, bytes, formats, pixels and
geometry; latents by dtype, finiteness and exact shape for the size asked; the response size before decoding.
Work whose caller has gone is dropped before it starts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from imagegen_client.outputs import encode_array

from imagegen.common.families.inputs import decode_inputs, latent_shape
from imagegen.common.images import to_float_array
from imagegen.common.options import check_size
from imagegen.common.serving import metrics
from imagegen.common.serving.config import limits_from_args
from imagegen.common.serving.convert import format_name, grids_to_proto
from imagegen.common.serving.handlers import Caller, in_executor, require_ready, rpc
from imagegen.common.serving.hosting import ComputeThread, HostedModel
from imagegen.common.serving.server import Service
from imagegen.common.validation import (
    check_image_blobs,
    check_latents,
    check_output_format,
    check_response_size,
)
from imagegen.common.wire import LATENTS, pack, unpack
from imagegen.v1 import common_pb2, denoiser_pb2, vae_pb2, vae_pb2_grpc

SERVICE = "imagegen.v1.VaeService"


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, args: argparse.Namespace, model: HostedModel) -> None:
        self.model = model
        self.limits = limits_from_args(args)
        self.default_timeout = args.default_timeout
        self.executor = ComputeThread("vae")
        self.stage = None

    async def prepare(self) -> None:
        model = self.model
        self.stage = await in_executor(self.executor, model.load, model.family.vae)
        self.info = model.info(("vae",))

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    @rpc(SERVICE)
    async def Describe(self, request, context):
        require_ready(self.stage is not None, "vae")
        return self.info

    @rpc(SERVICE)
    async def EncodeCondition(self, request: vae_pb2.EncodeConditionRequest, context) -> denoiser_pb2.ConditionLatents:
        require_ready(self.stage is not None, "vae")
        family = self.model.family
        check_image_blobs(request.images, family.defaults, family.name, self.limits)
        caller = Caller(context, self.default_timeout)
        latents, shapes = await in_executor(
            self.executor, self._encode, request.images, caller.gone, unwanted=caller.gone
        )
        return denoiser_pb2.ConditionLatents(safetensors=latents, shapes=grids_to_proto(shapes))

    def _encode(self, images, gone: Callable[[], bool]) -> tuple[bytes, list[tuple[int, int, int]]]:
        pil = decode_inputs(images, self.model.family, self.limits, gone)
        start = time.monotonic()
        latents, shapes = self.stage.encode_condition(pil)
        metrics.STAGE_SECONDS.labels("vae_encode").observe(time.monotonic() - start)
        return pack(latents, LATENTS), shapes

    @rpc(SERVICE)
    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        require_ready(self.stage is not None, "vae")
        family = self.model.family
        fmt = format_name(request.output_format)
        check_output_format(fmt, family.defaults.output_channels, family.name)
        width, height = request.width, request.height
        check_size(width, height, self.limits, multiple=family.defaults.size_multiple)
        caller = Caller(context, self.default_timeout)
        latents = await in_executor(self.executor, unpack, request.latents, LATENTS, "latents", unwanted=caller.gone)
        per_image = latent_shape(family, self.stage, width, height)
        count = check_latents(latents, per_image, width, height, self.limits)
        check_response_size(count, width, height, fmt, self.limits, family.defaults.output_channels)
        value = request.output_format or common_pb2.OUTPUT_FORMAT_PNG
        response = vae_pb2.DecodeResponse()
        blobs = await in_executor(self.executor, self._decode, latents, width, height, fmt, unwanted=caller.gone)
        del latents
        blobs.reverse()
        while blobs:  # each image moves into the response: one copy of the images at a time, not two
            response.images.add(data=blobs.pop(), format=value, width=width, height=height)
        return response

    def _decode(self, latents, width: int, height: int, fmt: str) -> list[bytes]:
        start = time.monotonic()
        array = to_float_array(self.stage.decode(latents, width, height))
        metrics.STAGE_SECONDS.labels("vae_decode").observe(time.monotonic() - start)
        return encode_array(array, fmt)


def make_service(args: argparse.Namespace) -> Service:
    servicer = VaeServicer(args, HostedModel.from_args(args))  # a bad folder fails before the port opens
    return Service(
        name=SERVICE,
        register=lambda server: vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
        max_receive_bytes=args.max_message_bytes,
    )
