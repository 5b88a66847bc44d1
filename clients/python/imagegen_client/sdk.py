"""Python SDK for the imagegen gateway: `ImageClient` (blocking) and `AsyncImageClient` (asyncio).

    from imagegen_client import ImageClient

    with ImageClient("localhost:50051", api_key="...") as client:
        result = client.generate("a red fox in the snow", width=512, height=512, seed=7)
        result.images[0].save("fox.png")          # PIL images
        exact = client.generate("a fox", output_format="npy", seed=7).array  # float32 [K, H, W, 3]

Unset options take the model family's diffusers defaults. Pass `progress=callback` to receive `Progress`
updates (stage, step of total, queue position) over the streaming RPC. Failures raise `ImageServiceError`
subclasses (`InvalidArgumentError.field` names the offending field).

Each call has a timeout (default 600 s) that bounds it, retries included. The gateway rides through stage
restarts within that deadline itself; the SDK retries only what did not reach a working gateway (UNAVAILABLE
while it restarts or drains, RESOURCE_EXHAUSTED with a retry hint), never what the gateway already retried
(`imagegen_client.retry`: one retry budget per request).

An API key is a bearer secret: the SDK refuses to send one in plaintext to anything but a loopback address,
unless `allow_plaintext_key=True` says that the network is trusted.

No torch here: the SDK needs grpcio, protobuf (with googleapis-common-protos), numpy and Pillow only.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import grpc
import numpy as np
import PIL.Image

from imagegen_client.errors import (
    DeadlineExceededError,
    ImageServiceError,
    InvalidArgumentError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from,
)
from imagegen_client.outputs import decode_output, to_pil_images
from imagegen_client.retry import DEFAULT_TIMEOUT_S, Deadline, RetryBudget, RetryPolicy
from imagegen_client.status import ErrorDetails
from imagegen_client.transport import client_options
from imagegen_client.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc

__all__ = [
    "AsyncImageClient",
    "DeadlineExceededError",
    "ImageClient",
    "ImageServiceError",
    "InvalidArgumentError",
    "OPTION_FIELDS",
    "Progress",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "Result",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
]

ImageInput = PIL.Image.Image | bytes | str | os.PathLike
_STAGES = {
    common_pb2.STAGE_QUEUED: "queued",
    common_pb2.STAGE_ENCODING: "encoding",
    common_pb2.STAGE_DENOISING: "denoising",
    common_pb2.STAGE_DECODING: "decoding",
}
# Every request field but these is an option, passed to the message as given (None: unset, the family's
# default): the proto is the one table, so a field added there is an SDK option with no change here.
_FIXED_FIELDS = {"prompt", "images", "request_id", "model", "output_format"}
OPTION_FIELDS = tuple(
    f.name for f in image_service_pb2.GenerateImageRequest.DESCRIPTOR.fields if f.name not in _FIXED_FIELDS
)


# ---------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Progress:
    stage: str  # "queued", "encoding", "denoising" or "decoding"
    step: int = 0
    total_steps: int = 0
    queue_position: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class Result:
    """The images of one request, as encoded by the server (`blobs`), decoded on first use."""

    request_id: str
    model: str
    seed: int
    output_format: str
    blobs: tuple[bytes, ...] = field(repr=False)

    @cached_property
    def array(self) -> np.ndarray:
        """float32 `[K, H, W, 3]` in [0, 1]: exact with `output_format="npy"`, else the decoded pixels / 255."""
        return np.stack([decode_output(blob, self.output_format) for blob in self.blobs])

    @cached_property
    def images(self) -> list[PIL.Image.Image]:
        if self.output_format == "NPY":
            return to_pil_images(self.array)  # rounds exactly as diffusers' output_type="pil"
        return [PIL.Image.open(io.BytesIO(blob)) for blob in self.blobs]


# ------------------------------------------------------------------------------------------------ shared core
def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine (localhost, 127.0.0.0/8, ::1, or a Unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:").lstrip("/")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, PIL.Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the server sees exactly these pixels
        return buffer.getvalue()
    with open(image, "rb") as file:
        return file.read()


def _format_value(name: str) -> int:
    try:
        return common_pb2.OutputFormat.Value("OUTPUT_FORMAT_" + name.upper())
    except ValueError:
        raise ValueError(f"output_format must be png, jpeg, webp or npy, got {name!r}") from None


def _lora_weights(loras: Any) -> list[common_pb2.LoraWeight]:
    """`loras={"name": 0.8}` (or (name, scale) pairs, in order) -> the request's LoraWeight list."""
    if not loras:
        return []
    pairs = loras.items() if isinstance(loras, dict) else loras
    return [common_pb2.LoraWeight(name=str(name), scale=float(scale)) for name, scale in pairs]


class _Core:
    """What both clients share: requests, metadata, deadlines, retries, results."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        model: str | None,
        timeout: float,
        retry: RetryPolicy,
        secure: bool,
        allow_plaintext_key: bool,
    ):
        if api_key and not secure and not allow_plaintext_key and not is_loopback(target):
            raise ValueError(
                f"refusing to send an API key in plaintext to {target}: use tls=True (or root_certificates), "
                "or pass allow_plaintext_key=True if this network is trusted"
            )
        self.target = target
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.model = model
        self.timeout = timeout
        self.retry = retry

    def request(self, images: Sequence[ImageInput] | None, prompt: str, options: dict[str, Any]):
        unknown = set(options) - {*OPTION_FIELDS, "output_format", "request_id", "model", "loras"}
        if unknown:
            raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
        fields = {k: v for k, v in options.items() if k in OPTION_FIELDS and v is not None}
        fields["output_format"] = _format_value(options.get("output_format") or "png")
        fields["model"] = options.get("model") or self.model or ""
        # One id for the call, retries included, so that their log lines correlate.
        fields["request_id"] = options.get("request_id") or uuid.uuid4().hex
        fields["loras"] = _lora_weights(options.get("loras"))
        if images is None:
            return image_service_pb2.GenerateImageRequest(prompt=prompt, **fields)
        if isinstance(images, PIL.Image.Image | bytes | str | os.PathLike):
            images = [images]
        return image_service_pb2.EditImageRequest(prompt=prompt, images=[_image_bytes(i) for i in images], **fields)

    def budget(self, timeout: float | None) -> RetryBudget:
        """This call's deadline and retries."""
        return self.retry.budget(Deadline.within(self.timeout if timeout is None else timeout, DEFAULT_TIMEOUT_S))

    @staticmethod
    def remaining(budget: RetryBudget) -> float:
        return max(0.001, budget.deadline.left())

    @staticmethod
    def result(response: image_service_pb2.ImageResponse) -> Result:
        value = response.images[0].format if response.images else common_pb2.OUTPUT_FORMAT_PNG
        fmt = common_pb2.OutputFormat.Name(value).removeprefix("OUTPUT_FORMAT_")
        blobs = tuple(image.data for image in response.images)
        return Result(response.request_id, response.model, response.seed, fmt, blobs)

    @staticmethod
    def progress(message: common_pb2.Progress) -> Progress:
        return Progress(
            _STAGES.get(message.stage, "unknown"),
            message.step,
            message.total_steps,
            message.queue_position,
            message.request_id,
        )

    @staticmethod
    def channel(grpc_module, target: str, tls: bool, root_certificates: bytes | None):
        """A channel from `grpc` (sync) or `grpc.aio`: both spell channel creation the same way."""
        if not tls and root_certificates is None:
            return grpc_module.insecure_channel(target, options=client_options())
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc_module.secure_channel(target, credentials, options=client_options())


ProgressCallback = Callable[[Progress], Any]


class _Client:
    """What both clients share: the connection and the per-call settings. `_grpc` is `grpc` or `grpc.aio`."""

    _grpc: ClassVar[Any] = grpc

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: bool = False,
        root_certificates: bytes | None = None,
        retry: RetryPolicy = RetryPolicy(),
        allow_plaintext_key: bool = False,
    ) -> None:
        secure = tls or root_certificates is not None
        self._core = _Core(target, api_key, model, timeout, retry, secure, allow_plaintext_key)
        self._channel = _Core.channel(self._grpc, target, tls, root_certificates)
        self._stub = image_service_pb2_grpc.ImageServiceStub(self._channel)


# ----------------------------------------------------------------------------------------------- sync client
class ImageClient(_Client):
    """Blocking client. `timeout` (seconds) bounds each call including its retries."""

    _grpc = grpc

    def generate(
        self, prompt: str, *, progress: ProgressCallback | None = None, timeout: float | None = None, **options: Any
    ) -> Result:
        """Text to image. Options: negative_prompt, width, height, steps, guidance_scale, cfg_normalization,
        cfg_truncation, max_sequence_length, seed, num_images, output_format ("png", "jpeg", "webp", "npy"),
        model, request_id, loras ({"adapter name": scale}, as diffusers' set_adapters)."""
        request = self._core.request(None, prompt, options)
        stream, unary = self._stub.GenerateImageStream, self._stub.GenerateImage
        return self._call(request, unary, stream, progress, timeout)

    def edit(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Result:
        """Edit `images` (PIL images, encoded bytes or file paths; one or a list) with `prompt`; options as
        `generate`."""
        request = self._core.request(images, prompt, options)
        return self._call(request, self._stub.EditImage, self._stub.EditImageStream, progress, timeout)

    def list_models(self, timeout: float | None = None) -> image_service_pb2.ListModelsResponse:
        request = image_service_pb2.ListModelsRequest()
        metadata = self._core.metadata
        return self._retrying(lambda t: self._stub.ListModels(request, timeout=t, metadata=metadata), timeout)

    def _call(self, request, unary, stream, progress: ProgressCallback | None, timeout: float | None) -> Result:
        if progress is None:
            return self._retrying(
                lambda t: self._core.result(unary(request, timeout=t, metadata=self._core.metadata)), timeout
            )

        def streamed(t: float | None) -> Result:
            call = stream(request, timeout=t, metadata=self._core.metadata)
            result = None
            try:
                for event in call:
                    if event.HasField("result"):
                        result = self._core.result(event.result)  # the stream ends next: read its status
                        continue
                    progress(self._core.progress(event.progress))
            finally:
                call.cancel()  # an exception in the callback (or ^C) cancels the request on the server too
            if result is None:
                raise ImageServiceError(ErrorDetails(grpc.StatusCode.INTERNAL, "stream ended without a result"))
            return result

        return self._retrying(streamed, timeout)

    def _retrying(self, attempt_call: Callable[[float], Any], timeout: float | None) -> Any:
        budget = self._core.budget(timeout)
        while True:
            try:
                return attempt_call(self._core.remaining(budget))
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error)
                delay = budget.delay(error.details)
                if delay is None:
                    raise error from None
            time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- async client
class AsyncImageClient(_Client):
    """asyncio client with the same methods as `ImageClient` (awaitable). Cancelling the awaiting task cancels
    the request on the server."""

    _grpc = grpc.aio

    async def generate(
        self, prompt: str, *, progress: ProgressCallback | None = None, timeout: float | None = None, **options: Any
    ) -> Result:
        request = self._core.request(None, prompt, options)
        return await self._call(request, self._stub.GenerateImage, self._stub.GenerateImageStream, progress, timeout)

    async def edit(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Result:
        request = self._core.request(images, prompt, options)
        return await self._call(request, self._stub.EditImage, self._stub.EditImageStream, progress, timeout)

    async def list_models(self, timeout: float | None = None) -> image_service_pb2.ListModelsResponse:
        request = image_service_pb2.ListModelsRequest()

        async def once(t: float | None):
            return await self._stub.ListModels(request, timeout=t, metadata=self._core.metadata)

        return await self._retrying(once, timeout)

    async def _call(self, request, unary, stream, progress: ProgressCallback | None, timeout: float | None) -> Result:
        async def once(t: float | None) -> Result:
            if progress is None:
                return self._core.result(await unary(request, timeout=t, metadata=self._core.metadata))
            call = stream(request, timeout=t, metadata=self._core.metadata)
            result = None
            try:
                async for event in call:
                    if event.HasField("result"):
                        result = self._core.result(event.result)  # the stream ends next: read its status
                        continue
                    outcome = progress(self._core.progress(event.progress))
                    if asyncio.iscoroutine(outcome):
                        await outcome
            finally:
                call.cancel()
            if result is None:
                raise ImageServiceError(ErrorDetails(grpc.StatusCode.INTERNAL, "stream ended without a result"))
            return result

        return await self._retrying(once, timeout)

    async def _retrying(self, attempt_call, timeout: float | None) -> Any:
        budget = self._core.budget(timeout)
        while True:
            try:
                return await attempt_call(self._core.remaining(budget))
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error)
                delay = budget.delay(error.details)
                if delay is None:
                    raise error from None
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncImageClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
