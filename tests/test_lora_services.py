"""LoRA adapters through the services: `serve all --lora-dir` behind the gateway, requests naming adapters.

Two concurrent requests with different adapters must each give its one-process image (the denoiser merges one
set per job and restores the base weights between them), an adapter's NAME.json must default the request's
steps, the gateway must list the adapters, and bad adapters must be INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from imagegen_client.sdk import ImageClient

from imagegen.common.lora.tiny import make_tiny_lora
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline
from imagegen.common.serving.status import parse_error
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc
from tests.service_harness import TORCH_THREADS, Service, stop_all

REQUEST = dict(negative_prompt="blurry", guidance_scale=4.0, width=64, height=64)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-services")
    model = tiny_checkpoint_cached("qwen-image")
    loras = root / "loras"
    make_tiny_lora(model, loras / "ink.safetensors", rank=4, seed=11)
    make_tiny_lora(model, loras / "neon.safetensors", rank=2, seed=12, fmt="kohya")
    (loras / "neon.json").write_text(json.dumps({"steps": 2}))
    make_tiny_lora(tiny_checkpoint_cached("z-image"), loras / "other_model.safetensors", rank=2)
    server = Service("all", "all", ["--model", str(model), "--lora-dir", str(loras)], root)
    try:
        server.wait_serving(timeout=240)
        yield server, model, loras
    finally:
        stop_all([server])


@pytest.fixture(scope="module")
def one_process(served):
    _, model, loras = served
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    pipeline = Pipeline(model, lora_dir=loras)
    yield lambda options, adapters: pipeline(options, loras=adapters)
    torch.set_num_threads(previous)


def test_concurrent_requests_with_different_adapters_equal_one_process(served, one_process) -> None:
    server, _, _ = served
    requests = [
        ("a lighthouse in fog", 5, {"ink": 0.7}, 3),
        ("a lighthouse in fog", 5, {"ink": 0.7, "neon": 1.3}, None),  # neon.json: 2 steps
    ]

    def call(request):
        prompt, seed, loras, steps = request
        with ImageClient(server.address, timeout=240) as client:
            extra = {"steps": steps} if steps else {}
            return client.generate(prompt, seed=seed, loras=loras, output_format="npy", **REQUEST, **extra).array

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(call, requests))
    for (prompt, seed, loras, steps), got in zip(requests, results, strict=True):
        options = RequestOptions(prompt, seed=seed, steps=steps, **REQUEST)
        expected = one_process(options, list(loras.items()))
        assert float(np.abs(got - expected).max()) == 0.0, loras
    assert float(np.abs(results[0] - results[1]).max()) > 1e-2  # the adapters (and steps) made a difference
    with ImageClient(server.address, timeout=240) as client:
        base = client.generate(requests[0][0], seed=5, steps=3, output_format="npy", **REQUEST).array
        listed = client.list_models().models[0].loras
    expected_base = one_process(RequestOptions(requests[0][0], seed=5, steps=3, **REQUEST), [])
    assert float(np.abs(base - expected_base).max()) == 0.0
    assert {info.name: info.steps for info in listed if info.HasField("steps")} == {"neon": 2}
    assert sorted(info.name for info in listed) == ["ink", "neon", "other_model"]


def test_bad_adapters_are_invalid_argument_naming_the_field(served) -> None:
    server, _, _ = served
    cases = [
        ([("missing", 1.0)], "loras[0].name"),
        ([("ink", 1.0), ("../ink", 1.0)], "loras[1].name"),
        ([("ink", float("inf"))], "loras[0].scale"),
        ([("other_model", 1.0)], "loras[0].name"),  # a Z-Image adapter on a Qwen-Image model
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        for loras, field in cases:
            request = image_service_pb2.GenerateImageRequest(
                prompt="x",
                steps=2,
                width=64,
                height=64,
                loras=[common_pb2.LoraWeight(name=n, scale=s) for n, s in loras],
            )
            with pytest.raises(grpc.RpcError) as error:
                stub.GenerateImage(request, timeout=120)
            details = parse_error(error.value)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details.message
            assert [f for f, _ in details.field_violations] == [field], details.message


def test_http_api_loras_extension_equals_grpc(served) -> None:
    import base64

    import requests

    server, _, _ = served
    body = {
        "prompt": "a lighthouse in fog",
        "size": "64x64",
        "num_inference_steps": 2,
        "seed": 9,
        "negative_prompt": "blurry",
        "guidance_scale": 4.0,
        "loras": {"ink": 0.7, "neon": 1.3},
    }
    url = f"http://127.0.0.1:{server.http_port}/v1/images/generations"
    answer = requests.post(url, json=body, timeout=240)
    assert answer.status_code == 200, answer.text
    png = base64.b64decode(answer.json()["data"][0]["b64_json"])
    with ImageClient(server.address, timeout=240) as client:
        options = dict(REQUEST, steps=2, seed=9, loras={"ink": 0.7, "neon": 1.3})
        expected = client.generate(body["prompt"], **options).blobs[0]
    assert png == expected
    unknown = requests.post(url, json={**body, "loras": {"nope": 1.0}}, timeout=60)
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"], unknown.text
