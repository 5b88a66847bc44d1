"""The HTTP API's pieces without a server: the request table's conversion to the gRPC request, gRPC statuses as
OpenAI errors, and the --http-port defaults."""

from __future__ import annotations

import grpc
import pytest
from imagegen_client.sdk import OPTION_FIELDS
from imagegen_client.status import parse_error
from imagegen_client.v1 import common_pb2, image_service_pb2
from pydantic import ValidationError

from imagegen.cli import build_parser
from imagegen.common.serving.status import invalid_argument, with_reason
from imagegen.services.flags import HTTP_PORT
from imagegen.services.http_errors import HttpAbort, status_of
from imagegen.services.http_params import PARAMS, ImageEditFields, ImageGenerationRequest, to_request


def test_table_covers_every_request_option():
    fields = {p.field for p in PARAMS if p.field} | {"width", "height", "output_format", "loras"}
    assert set(OPTION_FIELDS) | {"prompt", "model"} <= fields | {"num_images"}
    assert set(image_service_pb2.GenerateImageRequest.DESCRIPTOR.fields_by_name) - {"request_id"} <= fields


def test_generation_body_becomes_the_grpc_request():
    body = ImageGenerationRequest.model_validate(
        {"prompt": "a fox", "size": "64x48", "n": 2, "seed": 7, "num_inference_steps": 3, "output_format": "webp"}
    )
    request = to_request(body, None)
    assert isinstance(request, image_service_pb2.GenerateImageRequest)
    assert (request.width, request.height, request.num_images, request.seed, request.steps) == (64, 48, 2, 7, 3)
    assert request.output_format == common_pb2.OUTPUT_FORMAT_WEBP and not request.HasField("guidance_scale")
    auto = to_request(ImageGenerationRequest.model_validate({"prompt": "x", "size": "auto"}), None)
    assert not auto.HasField("width") and auto.output_format == common_pb2.OUTPUT_FORMAT_PNG


def test_edit_form_text_is_parsed_by_the_same_table():
    body = ImageEditFields.model_validate({"prompt": "x", "seed": "5", "guidance_scale": "2.5", "stream": "true"})
    request = to_request(body, [b"png"])
    assert isinstance(request, image_service_pb2.EditImageRequest) and list(request.images) == [b"png"]
    assert (request.seed, request.guidance_scale, body.stream) == (5, 2.5, True)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "size": "64"},
        {"prompt": "x", "seed": 2**63},
        {"prompt": "x", "n": 2**31},
        {"prompt": "x", "guidance_scale": float("nan")},
        {"prompt": "x", "partial_images": 4},
        {"prompt": "x", "quality": "hd"},
        {"size": "64x64"},
    ],
)
def test_bodies_outside_the_proto_ranges_are_refused_before_the_request(body):
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate(body)


def test_url_response_format_is_a_clear_400():
    with pytest.raises(Exception) as caught:
        to_request(ImageGenerationRequest.model_validate({"prompt": "x", "response_format": "url"}), None)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "url is not offered" in caught.value.message


def _abort(failure) -> HttpAbort:
    return HttpAbort(failure.code, failure.message, failure.to_status().trailing_metadata)


def test_statuses_map_to_openai_errors():
    status, body, headers = status_of(parse_error(_abort(invalid_argument("width", "must be a multiple of 16"))))
    assert (status, body["error"]["param"], body["error"]["type"]) == (400, "size", "invalid_request_error")
    status, body, _ = status_of(parse_error(_abort(invalid_argument("model", "unknown model 'x' (served: a)"))))
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    full = with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", "queue full", retry_after=2.5)
    status, body, headers = status_of(parse_error(_abort(full)))
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "queue_full", "3")
    too_big = with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE", "too large")
    assert status_of(parse_error(_abort(too_big)))[0] == 400
    for code, expected in (
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ):
        assert status_of(parse_error(HttpAbort(code, "m", ())))[0] == expected, code


def test_http_port_is_off_for_the_gateway_and_on_in_serve_all():
    parser = build_parser()
    assert parser.parse_args(["serve", "gateway"]).http_port == 0
    assert parser.parse_args(["serve", "all", "--model", "m"]).http_port == HTTP_PORT == 8000
    assert parser.parse_args(["serve", "all", "--model", "m", "--http-port", "0"]).http_port == 0
