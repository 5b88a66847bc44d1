"""The gateway's OpenAI-compatible HTTP API (FastAPI): /v1/images/generations, /v1/images/edits, /v1/models.

Each request becomes the ImageService request a gRPC caller would send (`http_params`) and runs through the same
servicer methods, with `HttpContext` in place of the gRPC context: one code path for API keys (`Authorization:
Bearer`), validation, deadlines, the queue, metrics and the access log. Failures come back in OpenAI's error
shape (`http_errors`). With `stream=true` the answer is server-sent events in the shape of OpenAI's image
streaming events: `<kind>.progress` (ours: stage, step, queue position), then one `<kind>.completed` per image,
where kind is `image_generation` or `image_edit`; a failure mid-stream is an `error` event.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from imagegen_client.status import parse_error
from imagegen_client.v1 import common_pb2, image_service_pb2
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive

from imagegen.common.serving.admission import Admission, AdmissionConfig
from imagegen.common.serving.echo import clip
from imagegen.common.serving.status import RpcFailure
from imagegen.services.http_errors import (
    HttpAbort,
    HttpContext,
    error_body,
    failure_response,
    plain_error,
    status_of,
)
from imagegen.services.http_multipart import MultipartError, PartLimits, parse_multipart
from imagegen.services.http_params import (
    ImageEditFields,
    ImageGenerationRequest,
    edit_form_schema,
    to_request,
)

TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP spelling of a gRPC deadline
IMAGE_FIELDS = ("image", "image[]")  # the openai client sends one image as `image`, a list as `image[]`
_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_tokens_details": {}}  # not counted
_ERRORS: dict[int | str, Any] = {"4XX": {"description": "OpenAI error shape"}, "5XX": {"description": "same"}}
CLIENT_GONE = 499  # nginx's "client closed request": the status of an answer nobody receives, for the record
T = TypeVar("T")
log = logging.getLogger("imagegen.http")


def build_app(servicer, admission: AdmissionConfig, max_images: int) -> FastAPI:
    """The HTTP app over `servicer` (an `ImageServicer`), behind `Admission` (origin, API key, requests in
    flight, body limits per route: `common.serving.admission`)."""
    app = FastAPI(
        title="imagegen OpenAI-compatible Images API",
        version="1",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(Admission, config=admission)
    _add_error_handlers(app)
    part_limits = PartLimits(max_files=max_images + 1, file_bytes=admission.file_part_bytes)

    @app.post("/v1/images/generations", responses=_ERRORS)
    async def generations(body: ImageGenerationRequest, request: Request):  # type: ignore[valid-type]
        message = to_request(body, None)
        return await _answer(request, body, message, servicer.GenerateImage, servicer.GenerateImageStream)

    @app.post(
        "/v1/images/edits",
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": edit_form_schema()}}}
        },
    )
    async def edits(request: Request):
        body, images = await _edit_form(request, part_limits)
        message = to_request(body, images)
        return await _answer(request, body, message, servicer.EditImage, servicer.EditImageStream)

    @app.get("/v1/models", responses=_ERRORS)
    async def models(request: Request):
        listed = await servicer.ListModels(image_service_pb2.ListModelsRequest(), _context(request))
        return {"object": "list", "data": [_model(m, listed.default_model) for m in listed.models]}

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS)
    async def model(model_id: str, request: Request):
        listed = await servicer.ListModels(image_service_pb2.ListModelsRequest(), _context(request))
        for summary in listed.models:
            if summary.model_id == model_id:
                return _model(summary, listed.default_model)
        return plain_error(404, f"unknown model {clip(model_id)!r}", "model", code="model_not_found")

    return app


# ------------------------------------------------------------------------------------------------- requests
def _context(request: Request) -> HttpContext:
    text = request.headers.get(TIMEOUT_HEADER)
    timeout = None
    if text is not None:
        try:
            timeout = float(text)
        except ValueError:
            timeout = math.nan
        if not 0 < timeout < math.inf:
            raise HTTPException(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {clip(text)!r}")
    return HttpContext(request.headers.get("authorization"), timeout)


async def _edit_form(request: Request, limits: PartLimits):
    """The multipart edit body -> (validated fields, image bytes), each part held to its limit as it streams
    in (`http_multipart`)."""
    try:
        parts = await parse_multipart(request.headers.get("content-type", ""), request.stream(), limits)
    except MultipartError as exc:
        raise BadParam(exc.param or "body", str(exc), exc.status) from None
    images, fields = [], {}
    for part in parts:
        key = part.name
        if key == "mask":
            raise BadParam("mask", "masks are not supported: the model edits the whole image")
        if key in IMAGE_FIELDS:
            if not part.is_file:
                raise BadParam(key, "must be a file part")
            images.append(bytes(part.data))
        elif part.is_file:
            raise BadParam(clip(key), "must be a text field, not a file")
        else:
            fields[key] = part.data.decode(errors="replace")
    if not images:
        raise BadParam("image", "at least one image is required")
    try:
        return ImageEditFields.model_validate(fields), images
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


class BadParam(HTTPException):
    """A 400 (or `status`) that names its parameter (the form's own checks, before the servicer's)."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(status, message if message.startswith(f"{param}:") else f"{param}: {message}")
        self.param = param


# ------------------------------------------------------------------------------------------------ responses
async def _answer(request: Request, body, message, unary, stream):
    context = _context(request)
    fmt = body.output_format or "png"
    if not body.stream:
        response = await _unless_disconnected(request, unary(message, context))
        if response is None:
            return JSONResponse(error_body("the client disconnected", "server_error", "cancelled"), CLIENT_GONE)
        return JSONResponse(_images(response, fmt))
    events = stream(message, context)
    try:
        # The first event comes once the request is authenticated and valid: anything before it is a plain
        # HTTP error with its status, not an event.
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    kind = "image_edit" if isinstance(message, image_service_pb2.EditImageRequest) else "image_generation"
    return StreamingResponse(
        _sse(first, events, kind, fmt), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _unless_disconnected(request: Request, call: Awaitable[T]) -> T | None:
    """`call`'s result, or None as soon as the client disconnects: then the call is cancelled, as a gRPC
    caller's cancellation cancels it (the servicer logs and counts it CANCELLED, its stage calls are cancelled,
    the denoiser stops before its next step). A streamed answer gets the same from Starlette's own watcher."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself
        gone.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()  # its response, or its error for the error handlers
    await asyncio.gather(work, return_exceptions=True)  # the cancellation runs its course (access log, metrics)
    return None


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone: the body is read by now, so the next message is `http.disconnect`
    (uvicorn sends it when the connection closes; nothing is polled)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _images(response: image_service_pb2.ImageResponse, fmt: str) -> dict:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image.data).decode()} for image in response.images],
        "output_format": fmt,
        "size": _size(response),
        "model": response.model,  # extensions: what ran, and the seed that reproduces it
        "seed": response.seed,
    }


def _size(response: image_service_pb2.ImageResponse) -> str:
    if not response.images:
        return "auto"
    with PIL.Image.open(io.BytesIO(response.images[0].data)) as image:  # reads the header only
        return f"{image.width}x{image.height}"


async def _sse(first, events: AsyncIterator, kind: str, fmt: str) -> AsyncIterator[str]:
    try:
        event = first
        while True:
            for payload in _payloads(event, kind, fmt):
                yield f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
    except HttpAbort as error:
        _, body, _ = status_of(parse_error(error))
        yield f"event: error\ndata: {json.dumps({'type': 'error', **body})}\n\n"
    finally:
        await events.aclose()


def _payloads(event: image_service_pb2.ImageEvent, kind: str, fmt: str) -> list[dict]:
    now = int(time.time())
    if event.HasField("progress"):
        progress = event.progress
        stage = common_pb2.Stage.Name(progress.stage).removeprefix("STAGE_").lower()
        return [
            {
                "type": f"{kind}.progress",
                "created_at": now,
                "stage": stage,
                "step": progress.step,
                "total_steps": progress.total_steps,
                "queue_position": progress.queue_position,
            }
        ]
    response = event.result
    size = _size(response)
    return [
        {
            "type": f"{kind}.completed",
            "b64_json": base64.b64encode(image.data).decode(),
            "created_at": now,
            "size": size,
            "quality": "auto",
            "background": "opaque",
            "output_format": fmt,
            "usage": _USAGE,
            "image_index": index,
            "model": response.model,
            "seed": response.seed,
        }
        for index, image in enumerate(response.images)
    ]


def _model(summary: image_service_pb2.ModelSummary, default: str) -> dict:
    return {
        "id": summary.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "imagegen",
        "family": summary.family,  # extensions
        "takes_images": summary.takes_images,
        "default_steps": summary.default_steps,
        "default_guidance_scale": summary.default_guidance_scale,
        "default_width": summary.default_width or None,  # None: from the input image
        "default_height": summary.default_height or None,
        "default_negative_prompt": (
            summary.default_negative_prompt if summary.HasField("default_negative_prompt") else None
        ),
        "default": summary.model_id == default,
    }


# ----------------------------------------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HttpAbort)
    async def aborted(_request: Request, exc: HttpAbort):
        return failure_response(exc)

    @app.exception_handler(RpcFailure)
    async def failed(_request: Request, exc: RpcFailure):  # raised before the servicer, e.g. response_format=url
        return failure_response(HttpAbort(exc.code, exc.message, exc.to_status().trailing_metadata))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        # Only the names in `loc`: a JSON decode error's integer parts are byte offsets, and keys are the
        # caller's strings (clipped).
        location = [clip(part) for part in first.get("loc", ()) if isinstance(part, str) and part != "body"]
        param = location[0] if location and first.get("type") != "json_invalid" else None
        message = f"{'.'.join(location) or 'body'}: {clip(str(first.get('msg', 'invalid request')), 200)}"
        return plain_error(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return plain_error(exc.status_code, str(exc.detail), getattr(exc, "param", None))

    @app.exception_handler(UnicodeError)
    async def bad_text(_request: Request, _exc: UnicodeError):  # e.g. a lone surrogate ("\ud800") in a string
        return plain_error(400, "body: strings must be valid Unicode (no lone surrogates)")

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):
        log.error("unhandled HTTP error", exc_info=exc)
        return JSONResponse(error_body("internal error", "server_error", "internal_error"), 500)
