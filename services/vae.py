"""VaeService: edit images -> condition latents; final latents -> images in the requested output format."""

from __future__ import annotations

import argparse
import time

from common.errors import InvalidArgument
from common.images import decode_image, to_float_array
from common.outputs import encode_array
from common.serving import metrics
from common.serving.convert import format_name, grids_to_proto
from common.serving.handlers import in_executor, require_ready, rpc
from common.serving.hosting import HostedModel, compute_thread
from common.serving.server import Service
from common.wire import pack, unpack
from imagegen.v1 import common_pb2, denoiser_pb2, vae_pb2, vae_pb2_grpc

SERVICE = "imagegen.v1.VaeService"
LATENTS = "latents"
LATENT_CHANNELS, VAE_SCALE = 16, 8  # both families


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, model: HostedModel) -> None:
        self.model = model
        self.executor = compute_thread("vae")
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
        defaults = self.model.family.defaults
        if not self.model.family.takes_images or not defaults.min_images <= len(request.images) <= defaults.max_images:
            raise InvalidArgument(
                "images", f"{self.model.family.name} takes {defaults.min_images}-{defaults.max_images}"
            )
        latents, shapes = await in_executor(self.executor, self._encode, list(request.images))
        return denoiser_pb2.ConditionLatents(safetensors=latents, shapes=grids_to_proto(shapes))

    def _encode(self, images: list[bytes]) -> tuple[bytes, list[tuple[int, int, int]]]:
        pil = [decode_image(data, f"images[{i}]") for i, data in enumerate(images)]
        start = time.monotonic()
        latents, shapes = self.stage.encode_condition(pil)
        metrics.STAGE_SECONDS.labels("vae_encode").observe(time.monotonic() - start)
        return pack(latents, LATENTS), shapes

    @rpc(SERVICE)
    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        require_ready(self.stage is not None, "vae")
        fmt = format_name(request.output_format)
        width, height = request.width, request.height
        for name, value in (("width", width), ("height", height)):
            if value < 16 or value % 16:
                raise InvalidArgument(name, f"must be a positive multiple of 16, got {value}")
        latents = unpack(request.latents, LATENTS, "latents")
        per_image = LATENT_CHANNELS * (height // VAE_SCALE) * (width // VAE_SCALE)
        if latents.dim() not in (3, 4) or latents.numel() != latents.shape[0] * per_image:
            raise InvalidArgument("latents", f"shape {tuple(latents.shape)} does not fit {width}x{height} images")
        blobs = await in_executor(self.executor, self._decode, latents, width, height, fmt)
        value = request.output_format or common_pb2.OUTPUT_FORMAT_PNG
        images = [common_pb2.EncodedImage(data=b, format=value, width=width, height=height) for b in blobs]
        return vae_pb2.DecodeResponse(images=images)

    def _decode(self, latents, width: int, height: int, fmt: str) -> list[bytes]:
        start = time.monotonic()
        array = to_float_array(self.stage.decode(latents, width, height))
        metrics.STAGE_SECONDS.labels("vae_decode").observe(time.monotonic() - start)
        return encode_array(array, fmt)


def make_service(args: argparse.Namespace) -> Service:
    servicer = VaeServicer(HostedModel.from_args(args))  # a bad folder fails before the port opens
    return Service(
        name=SERVICE,
        register=lambda server: vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server),
        prepare=servicer.prepare,
        close=servicer.close,
    )
