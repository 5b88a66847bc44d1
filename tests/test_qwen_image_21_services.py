"""Qwen-Image-2.1 through the services: a private redis-server and encoder + denoiser + VAE + gateway as separate
processes (encoder and denoiser share Redis: keys travel, tensors stay there). The images equal the in-process
`Pipeline`'s run in this session, to the byte: NPY (the float32 RGBA array) and PNG over gRPC, PNG over HTTP,
with and without CFG; JPEG, which has no alpha channel, is refused up front with INVALID_ARGUMENT naming
`output_format` (gRPC) or HTTP 400 (and by the VAE service reached directly); sizes that are not multiples of 32
are refused as the in-process pipeline refuses them."""

from __future__ import annotations

import base64
import io

import grpc
import numpy as np
import PIL.Image
import pytest
import requests
import torch
from imagegen_client.outputs import decode_output, encode_array
from imagegen_client.sdk import ImageClient, InvalidArgumentError

from imagegen.common.families.qwen_image_21 import NAME
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline
from imagegen.common.serving.status import parse_error
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import common_pb2, vae_pb2, vae_pb2_grpc
from tests.service_harness import TORCH_THREADS, RedisServer, Service, free_port, stop_all

PROMPT = "a red fox in the snow"
CASES = {
    "no-cfg": dict(width=64, height=32, steps=3, seed=5),
    "cfg-two-images": dict(
        width=32, height=64, steps=2, seed=6, negative_prompt="blurry", guidance_scale=4.0, num_images=2
    ),
}


@pytest.fixture(scope="module")
def folder():
    return tiny_checkpoint_cached(NAME)


@pytest.fixture(scope="module")
def stack(folder, tmp_path_factory):
    logs = tmp_path_factory.mktemp("qwen21-service-logs")
    redis = RedisServer(logs)
    model = ["--model", str(folder), "--model-id", NAME]
    cache = ["--redis-url", redis.url]
    stages = {
        "encoder": Service("qwen21-encoder", "encoder", model + cache, logs),
        "denoiser": Service("qwen21-denoiser", "denoiser", model + cache, logs),
        "vae": Service("qwen21-vae", "vae", model, logs),
    }
    gateway = None
    try:
        for service in stages.values():
            service.wait_serving(timeout=180)
        http_port = free_port()
        addresses = [f"--{name}={service.address}" for name, service in stages.items()]
        gateway = Service("qwen21-gateway", "gateway", [*addresses, "--http-port", str(http_port)], logs)
        gateway.http_port = http_port
        gateway.wait_serving(timeout=120)
        yield stages, gateway
    finally:
        stop_all([*stages.values(), *([gateway] if gateway else []), redis])


@pytest.fixture(scope="module")
def in_process(folder):
    """The in-process pipeline's float32 RGBA images `[K, H, W, 4]`, at the services' torch thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    pipeline = Pipeline(folder)
    yield lambda options: pipeline(RequestOptions(PROMPT, **options))
    torch.set_num_threads(previous)


@pytest.mark.parametrize("case", CASES)
def test_grpc_npy_and_png_equal_in_process(stack, in_process, case) -> None:
    _, gateway = stack
    expected = in_process(CASES[case])
    assert expected.shape[-1] == 4 and expected.dtype == np.float32
    with ImageClient(gateway.address, timeout=120) as client:
        npy = client.generate(PROMPT, output_format="npy", **CASES[case])
        png = client.generate(PROMPT, output_format="png", **CASES[case])
    assert np.array_equal(npy.array, expected)  # bitwise: the float32 RGBA array
    assert list(png.blobs) == encode_array(expected, "PNG")  # the same bytes as the in-process PNG encoder's
    images = png.images
    assert [image.mode for image in images] == ["RGBA"] * len(expected)
    assert np.array_equal(np.stack([decode_output(blob, "PNG") for blob in png.blobs]), np.round(expected * 255) / 255)


def test_http_png_equals_in_process(stack, in_process) -> None:
    _, gateway = stack
    options = CASES["no-cfg"]
    body = {"prompt": PROMPT, "size": f"{options['width']}x{options['height']}", "seed": options["seed"]}
    body["num_inference_steps"] = options["steps"]
    reply = requests.post(f"http://127.0.0.1:{gateway.http_port}/v1/images/generations", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    served = base64.b64decode(reply.json()["data"][0]["b64_json"])
    assert served == encode_array(in_process(options), "PNG")[0]
    with PIL.Image.open(io.BytesIO(served)) as image:
        assert image.mode == "RGBA"


def test_jpeg_is_refused_naming_output_format(stack) -> None:
    stages, gateway = stack
    with ImageClient(gateway.address, timeout=60) as client, pytest.raises(InvalidArgumentError) as caught:
        client.generate(PROMPT, output_format="jpeg", **CASES["no-cfg"])
    assert caught.value.field == "output_format" and "alpha" in str(caught.value)
    body = {"prompt": PROMPT, "size": "64x32", "output_format": "jpeg"}
    reply = requests.post(f"http://127.0.0.1:{gateway.http_port}/v1/images/generations", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "output_format", reply.text
    # The VAE service reached directly refuses it too, before it reads the latents.
    request = vae_pb2.DecodeRequest(width=64, height=32, output_format=common_pb2.OUTPUT_FORMAT_JPEG)
    with grpc.insecure_channel(stages["vae"].address) as channel, pytest.raises(grpc.RpcError) as error:
        vae_pb2_grpc.VaeServiceStub(channel).Decode(request, timeout=30)
    details = parse_error(error.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in details.field_violations] == ["output_format"]


def test_sizes_off_the_32_pixel_grid_are_refused(stack) -> None:
    _, gateway = stack
    with ImageClient(gateway.address, timeout=60) as client, pytest.raises(InvalidArgumentError) as caught:
        client.generate(PROMPT, width=48, height=32, steps=2)
    assert caught.value.field == "width" and "multiple of 32" in str(caught.value)
    with ImageClient(gateway.address, timeout=120) as client:  # and the services still serve
        assert client.generate(PROMPT, output_format="npy", **CASES["no-cfg"]).array.shape == (1, 32, 64, 4)
