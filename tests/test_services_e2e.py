"""End to end: a private redis-server and gateway + encoder + denoiser + VAE as separate processes, per model.

One stack serves three tiny checkpoints through one gateway (`--routes`):
* qwen-image: encoder and denoiser share Redis (keys travel, tensors stay in Redis);
* qwen-image-edit: its denoiser reads another Redis database, so every key the encoder hands out is missing
  there and the gateway's "re-encode inline" recovery runs on each request;
* z-image: no Redis at all (encoder LRU, tensors inline) and a denoiser queue of 1 for the queue tests.
Images are compared with the diffusers pipelines run in this process (same torch thread count).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline, ZImagePipeline
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from imagegen_client.sdk import AsyncImageClient, ImageClient, InvalidArgumentError, RetryPolicy, UnauthenticatedError

from imagegen.common.serving.status import EMBEDDINGS_MISSING, QUEUE_FULL, parse_error
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    image_service_pb2,
    image_service_pb2_grpc,
)
from tests.service_harness import TORCH_THREADS, RedisServer, Service, stop_all

API_KEY = "test-key-0123456789"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
FAMILIES = ("qwen-image", "qwen-image-edit", "z-image")
SIZE = {"width": 64, "height": 48}
LONG_JOB = {"width": 512, "height": 512, "steps": 300}  # tens of ms a step: long enough to cancel mid-run
TOLERANCE = 1e-5


@dataclass
class Stack:
    services: dict[tuple[str, str], Service]
    redis: RedisServer  # replaced when a test restarts it
    gateway: Service | None = None

    def client(self, **kwargs) -> ImageClient:
        return ImageClient(self.gateway.address, api_key=API_KEY, timeout=120, **kwargs)

    def stub(self) -> tuple[grpc.Channel, image_service_pb2_grpc.ImageServiceStub]:
        channel = grpc.insecure_channel(self.gateway.address)
        return channel, image_service_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("service-logs")
    redis = RedisServer(logs)
    keys = logs / "api-keys.txt"
    keys.write_text(f"# rotated weekly\n{API_KEY}\nanother-key\n")
    services: dict[tuple[str, str], Service] = {}
    stack = Stack(services, redis)
    try:
        for family in FAMILIES:
            model = ["--model", str(tiny_checkpoint_cached(family)), "--model-id", family]
            encoder_cache = [] if family == "z-image" else ["--redis-url", redis.url]
            denoiser_cache = {"qwen-image": encoder_cache, "z-image": []}.get(
                family, ["--redis-url", redis.url[:-1] + "1"]
            )
            # The stages check internal requests against the same limits as the gateway (its --max-steps 400).
            queue = ["--queue-size", "1"] if family == "z-image" else []
            queue += ["--max-steps", "400"]
            services[family, "encoder"] = Service(f"{family}-encoder", "encoder", model + encoder_cache, logs)
            services[family, "denoiser"] = Service(
                f"{family}-denoiser", "denoiser", model + denoiser_cache + queue, logs
            )
            services[family, "vae"] = Service(f"{family}-vae", "vae", model, logs)
        for service in services.values():
            service.wait_serving()  # the addresses are final once they serve
        routes = {f: {s: services[f, s].address for s in ("encoder", "denoiser", "vae")} for f in FAMILIES}
        limits = ["--max-prompt-chars", "300", "--max-input-bytes", "200000", "--max-input-pixels", str(1 << 20)]
        gateway_args = ["--routes", json.dumps(routes), "--default-model", "qwen-image", "--api-keys-file", str(keys)]
        stack.gateway = Service("gateway", "gateway", gateway_args + limits + ["--max-steps", "400"], logs)
        stack.gateway.wait_serving()
        yield stack
    finally:
        stop_all([*services.values(), *([stack.gateway] if stack.gateway else []), stack.redis])


# ------------------------------------------------------------------------------------------- diffusers reference
@pytest.fixture(scope="module")
def reference():
    """diffusers' image for (family, prompt, options), float32 [K, H, W, 3], as output_type="np"."""
    classes = {"qwen-image": QwenImagePipeline, "qwen-image-edit": QwenImageEditPipeline, "z-image": ZImagePipeline}
    pipes = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)

    def run(family: str, prompt: str, seed: int, **kwargs) -> np.ndarray:
        if family not in pipes:
            pipes[family] = classes[family].from_pretrained(tiny_checkpoint_cached(family), local_files_only=True)
            pipes[family].set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            return pipes[family](prompt=prompt, generator=generator, output_type="np", **kwargs).images

    yield run
    torch.set_num_threads(previous)


def _random_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32
    diff = float(np.abs(actual - expected).max())
    assert diff <= TOLERANCE, f"max |diff| {diff} > {TOLERANCE}"


# ---------------------------------------------------------------------------------------------------- parity
def test_health_reflection_and_models(stack):
    for service in (*stack.services.values(), stack.gateway):
        assert service.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(stack.gateway.address) as channel:
        assert "imagegen.v1.ImageService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    with grpc.insecure_channel(stack.services["z-image", "denoiser"].address) as channel:
        assert "imagegen.v1.DenoiserService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    with stack.client() as client:
        listing = client.list_models()
    assert {m.model_id: m.family for m in listing.models} == {f: f for f in FAMILIES}
    assert listing.default_model == "qwen-image"


def test_generate_qwen_image_with_cfg_equals_diffusers(stack, reference):
    expected = reference(
        "qwen-image",
        "a red fox in the snow",
        7,
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        num_inference_steps=3,
        **SIZE,
    )
    with stack.client() as client:
        result = client.generate(
            "a red fox in the snow",
            negative_prompt="blurry",
            guidance_scale=4.0,
            steps=3,
            seed=7,
            output_format="npy",
            request_id="parity-qwen-1",
            **SIZE,
        )
    assert (result.request_id, result.model, result.seed) == ("parity-qwen-1", "qwen-image", 7)
    _assert_close(result.array, expected)


def test_generate_z_image_equals_diffusers(stack, reference):
    expected = reference(
        "z-image",
        "a blue boat on the lake",
        11,
        negative_prompt="blurry",
        guidance_scale=5.0,
        num_inference_steps=3,
        **SIZE,
    )
    with stack.client() as client:
        result = client.generate(
            "a blue boat on the lake",
            model="z-image",
            negative_prompt="blurry",
            guidance_scale=5.0,
            steps=3,
            seed=11,
            output_format="npy",
            **SIZE,
        )
    _assert_close(result.array, expected)


def test_edit_qwen_image_edit_equals_diffusers(stack, reference):
    image = _random_image(40, 56, 0)
    expected = reference("qwen-image-edit", "make it blue", 5, image=image, num_inference_steps=2, **SIZE)
    gateway = stack.gateway
    refetches = gateway.metric("imagegen_embedding_refetches_total")
    events = []
    with stack.client() as client:  # with a progress callback: EditImageStream
        options = dict(model="qwen-image-edit", steps=2, seed=5, output_format="npy", progress=events.append, **SIZE)
        result = client.edit([image], "make it blue", **options)
    _assert_close(result.array, expected)
    assert [(e.step, e.total_steps) for e in events if e.stage == "denoising"] == [(0, 2), (1, 2), (2, 2)]
    # This stack's denoiser reads another Redis database: the key was missing there, the gateway sent it inline.
    assert gateway.metric("imagegen_embedding_refetches_total") == refetches + 1


def test_output_formats_and_several_images(stack):
    magic = {"png": b"\x89PNG", "webp": b"RIFF", "jpeg": b"\xff\xd8"}
    with stack.client() as client:
        exact = client.generate("a lighthouse", steps=2, seed=3, num_images=2, output_format="npy", **SIZE).array
        assert exact.shape == (2, 48, 64, 3)
        for fmt, mean_error in (("png", 0.5 / 255), ("webp", 0.08), ("jpeg", 0.08)):
            result = client.generate("a lighthouse", steps=2, seed=3, num_images=2, output_format=fmt, **SIZE)
            assert result.output_format == fmt.upper()
            assert all(blob.startswith(magic[fmt]) for blob in result.blobs), fmt
            assert [im.size for im in result.images] == [(64, 48), (64, 48)]
            assert np.abs(result.array - exact).mean() <= mean_error, fmt
        # PNG is lossless: exactly the uint8 rounding of the float image (diffusers' output_type="pil").
        png = client.generate("a lighthouse", steps=2, seed=3, num_images=2, output_format="png", **SIZE)
        assert np.array_equal(np.stack([np.asarray(im) for im in png.images]), (exact * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------------ cache
def test_second_identical_request_is_a_cache_hit(stack):
    encoder = stack.services["qwen-image", "encoder"]
    request = dict(negative_prompt="dark", guidance_scale=3.0, steps=2, seed=1, output_format="npy", **SIZE)
    with stack.client() as client:
        first = client.generate("a cache test prompt", **request).array
        calls = encoder.metric("imagegen_text_encoder_calls_total")
        hits = encoder.metric("imagegen_cache_lookups_total", service="encoder", store="redis", result="hit")
        second = client.generate("a cache test prompt", **request).array
    assert encoder.metric("imagegen_text_encoder_calls_total") == calls, "the text encoder ran again"
    assert encoder.metric("imagegen_cache_lookups_total", service="encoder", store="redis", result="hit") == hits + 2
    assert np.array_equal(first, second)


def test_denoiser_answers_embeddings_missing_for_an_unknown_key(stack):
    request = denoiser_pb2.DenoiseRequest(
        options=denoiser_pb2.ResolvedOptions(
            family="qwen-image", prompt="x", steps=2, seed=0, num_images=1, max_sequence_length=512, **SIZE,
            cfg_truncation=1.0,  # complete, as the gateway resolves it: the stage checks every bound too
        ),
        prompt_embeds=encoder_pb2.Embeddings(key="imagegen:emb:v1:not-there"),
    )
    with grpc.insecure_channel(stack.services["qwen-image", "denoiser"].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=10))
    details = parse_error(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, EMBEDDINGS_MISSING)


def test_redis_killed_mid_run_still_gives_correct_images(stack, reference):
    encoder = stack.services["qwen-image", "encoder"]
    prompts = [f"a windmill number {i}" for i in range(6)]
    later = ["a cache test prompt", "a windmill after the outage"]  # one cached before the outage, one new
    options = dict(steps=2, seed=9, output_format="npy", **SIZE)
    expected = {p: reference("qwen-image", p, 9, num_inference_steps=2, **SIZE) for p in prompts + later}
    fallbacks = encoder.metric("imagegen_cache_inline_fallbacks_total", service="encoder")
    try:
        with stack.client() as client, ThreadPoolExecutor(len(prompts)) as pool:
            futures = {pool.submit(client.generate, p, **options): p for p in prompts}
            wait(futures, return_when=FIRST_COMPLETED)
            stack.redis.kill()
            results = {futures[f]: f.result().array for f in futures}
            results.update({p: client.generate(p, **options).array for p in later})
        for prompt, array in results.items():
            _assert_close(array, expected[prompt])
        assert encoder.metric("imagegen_cache_inline_fallbacks_total", service="encoder") >= fallbacks + len(later)
    finally:
        stack.redis.stop()
        stack.redis = RedisServer(stack.redis.log_path.parent, stack.redis.port)


# ------------------------------------------------------------------------------------------- queue and cancel
def _long_request(**extra) -> image_service_pb2.GenerateImageRequest:
    return image_service_pb2.GenerateImageRequest(
        model="z-image", prompt="a long job", seed=1, output_format=common_pb2.OUTPUT_FORMAT_NPY, **LONG_JOB, **extra
    )


def _next_progress(events, stage: int) -> common_pb2.Progress:
    for event in events:
        if event.HasField("progress") and event.progress.stage == stage:
            return event.progress
    raise AssertionError(f"stream ended before stage {stage}")


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _assert_next_request_runs(stack, reference) -> None:
    expected = reference("z-image", "after", 2, guidance_scale=0.0, num_inference_steps=2, **SIZE)
    with stack.client() as client:
        start = time.monotonic()
        result = client.generate(
            "after", model="z-image", guidance_scale=0.0, steps=2, seed=2, output_format="npy", **SIZE
        )
        assert time.monotonic() - start < 10
    _assert_close(result.array, expected)


def test_cancelled_stream_stops_the_denoiser_within_one_step(stack, reference):
    denoiser = stack.services["z-image", "denoiser"]
    steps_before = denoiser.metric("imagegen_denoise_steps_total")
    cancelled_before = denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled")
    channel, stub = stack.stub()
    with channel:
        call = stub.GenerateImageStream(_long_request(), metadata=AUTH, timeout=120)
        seen = 0
        while seen < 2:
            seen = _next_progress(call, common_pb2.STAGE_DENOISING).step
        call.cancel()
    _wait_for(lambda: denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled") == cancelled_before + 1)
    ran = denoiser.metric("imagegen_denoise_steps_total") - steps_before
    # The step running when the cancel arrived may finish; no further step starts.
    assert seen <= ran <= seen + 2, (seen, ran)
    _assert_next_request_runs(stack, reference)


def test_full_queue_answers_resource_exhausted(stack, reference):
    channel, stub = stack.stub()
    with channel:
        running = stub.GenerateImageStream(_long_request(), metadata=AUTH, timeout=120)
        _next_progress(running, common_pb2.STAGE_DENOISING)
        # Denoising runs off the event loop: health answers at once while the only worker is busy.
        start = time.monotonic()
        assert stack.services["z-image", "denoiser"].health() == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - start < 1.0
        waiting = stub.GenerateImageStream(_long_request(), metadata=AUTH, timeout=120)
        assert _next_progress(waiting, common_pb2.STAGE_QUEUED).queue_position == 1
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.GenerateImage(_long_request(), metadata=AUTH, timeout=30)
        details = parse_error(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL)
        # The gateway retried it a few times (about 1 s apart, the denoiser's retry hint), then gave up well
        # before the deadline, without a retry hint: the caller should not retry what the gateway just did.
        assert details.retry_delay is None and time.monotonic() - start < 10
        waiting.cancel()
        running.cancel()
    _assert_next_request_runs(stack, reference)


def test_deadline_stops_the_denoiser(stack, reference):
    denoiser = stack.services["z-image", "denoiser"]
    before = denoiser.metric("imagegen_denoise_jobs_total", outcome="deadline")
    steps_before = denoiser.metric("imagegen_denoise_steps_total")
    with stack.client(retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(Exception) as caught:
            client.generate("a long job", model="z-image", seed=1, timeout=3.0, **LONG_JOB)
    assert getattr(caught.value, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    _wait_for(lambda: denoiser.metric("imagegen_denoise_jobs_total", outcome="deadline") == before + 1)
    assert denoiser.metric("imagegen_denoise_steps_total") - steps_before < LONG_JOB["steps"]
    _assert_next_request_runs(stack, reference)


# -------------------------------------------------------------------------------------------- auth and input
def test_missing_or_wrong_api_key_is_unauthenticated(stack):
    for api_key in (None, "wrong-key"):
        with ImageClient(stack.gateway.address, api_key=api_key, timeout=10) as client:
            with pytest.raises(UnauthenticatedError):
                client.generate("a fox", steps=2, **SIZE)
    channel, stub = stack.stub()
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(image_service_pb2.ListModelsRequest(), metadata=(("authorization", "Basic abc"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _bomb() -> bytes:
    """A few kilobytes of PNG that decode to 25 megapixels."""
    buffer = io.BytesIO()
    PIL.Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


_IMAGE = _png(_random_image(40, 56, 1))
G, E = "generate", "edit"
BAD_INPUTS = [
    # (rpc, request fields, field named by the violation)
    (G, {"width": 17}, "width"),
    (G, {"width": 0}, "width"),
    (G, {"height": -16}, "height"),
    (G, {"height": 8192}, "height"),
    (G, {"steps": 0}, "steps"),
    (G, {"steps": 1}, "steps"),
    (G, {"steps": 401}, "steps"),
    (G, {"guidance_scale": -1.0}, "guidance_scale"),
    (G, {"guidance_scale": math.nan}, "guidance_scale"),
    (G, {"guidance_scale": math.inf}, "guidance_scale"),
    (G, {"cfg_normalization": 0.5}, "cfg_normalization"),
    (G, {"cfg_truncation": 0.5}, "cfg_truncation"),
    (G, {"model": "z-image", "cfg_truncation": -1.0}, "cfg_truncation"),
    (G, {"max_sequence_length": 0}, "max_sequence_length"),
    (G, {"max_sequence_length": 2000}, "max_sequence_length"),
    (G, {"model": "z-image", "max_sequence_length": 961}, "max_sequence_length"),
    (G, {"seed": -1}, "seed"),
    (G, {"num_images": 0}, "num_images"),
    (G, {"num_images": 9}, "num_images"),
    (G, {"prompt": "x" * 301}, "prompt"),
    (G, {"prompt": "nul \x00 inside"}, "prompt"),
    (G, {"negative_prompt": "y" * 301}, "negative_prompt"),
    (G, {"model": "no-such-model"}, "model"),
    (G, {"output_format": 99}, "output_format"),
    (G, {"request_id": "spaces are not allowed"}, "request_id"),
    (G, {"model": "qwen-image-edit"}, "images"),
    (E, {"model": "qwen-image", "images": [_IMAGE]}, "images"),
    (E, {"model": "qwen-image-edit", "images": []}, "images"),
    (E, {"model": "qwen-image-edit", "images": [_IMAGE, _IMAGE]}, "images"),
    (E, {"model": "qwen-image-edit", "images": [b"not an image"]}, "images[0]"),
    (E, {"model": "qwen-image-edit", "images": [_bomb()]}, "images[0]"),
    (E, {"model": "qwen-image-edit", "images": [b"\x89PNG" + bytes(200000)]}, "images[0]"),
    (E, {"model": "qwen-image-edit", "images": [_IMAGE] * 9}, "images"),
]


def test_bad_inputs_name_their_field_and_services_keep_serving(stack):
    assert len(BAD_INPUTS) >= 20
    encodes = stack.services["qwen-image", "encoder"].metric(
        "imagegen_requests_total", service="imagegen.v1.EncoderService", method="Encode", code="OK"
    )
    channel, stub = stack.stub()
    wrong = []
    with channel:
        for rpc, fields, field in BAD_INPUTS:
            base = {"prompt": "ok", "steps": 2, "seed": 0, **SIZE}
            if rpc == G:
                request, method = image_service_pb2.GenerateImageRequest(**{**base, **fields}), stub.GenerateImage
            else:
                request, method = image_service_pb2.EditImageRequest(**{**base, **fields}), stub.EditImage
            try:
                method(request, metadata=AUTH, timeout=30)
                wrong.append((fields, field, "succeeded"))
                continue
            except grpc.RpcError as error:
                details = parse_error(error)
            got = (details.code, [f for f, _ in details.field_violations])
            if got != (grpc.StatusCode.INVALID_ARGUMENT, [field]):
                wrong.append((str(fields)[:80], field, got, details.message))
    assert not wrong, wrong
    # Validation happened at the gateway: no backend saw these requests, and everything still serves.
    encoder = stack.services["qwen-image", "encoder"]
    assert (
        encoder.metric("imagegen_requests_total", service="imagegen.v1.EncoderService", method="Encode", code="OK")
        == encodes
    )
    for service in (*stack.services.values(), stack.gateway):
        assert service.alive() and service.health() == health_pb2.HealthCheckResponse.SERVING, service.name
    with stack.client() as client:
        assert client.generate("still fine", steps=2, seed=0, output_format="npy", **SIZE).array.shape == (1, 48, 64, 3)


def test_sdk_raises_typed_invalid_argument(stack):
    with stack.client() as client, pytest.raises(InvalidArgumentError) as caught:
        client.generate("a fox", width=30, height=48, steps=2)
    assert caught.value.field == "width" and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_logs_are_json_with_the_request_id(stack):
    with stack.client() as client:
        client.generate("logged", steps=2, seed=0, request_id="log-check-42", **SIZE)
    for service in (stack.gateway, stack.services["qwen-image", "denoiser"]):
        lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
        assert any(line.get("request_id") == "log-check-42" and line["message"] == "rpc" for line in lines), (
            service.name
        )


def test_progress_stream_reports_stages_and_steps(stack):
    events = []
    lock = threading.Lock()

    def record(progress):
        with lock:
            events.append(progress)

    with stack.client() as client:
        client.generate("progress", steps=3, seed=0, progress=record, **SIZE)
    stages = [e.stage for e in events]
    assert stages[0] == "encoding" and stages[-1] == "decoding"
    steps = [(e.step, e.total_steps) for e in events if e.stage == "denoising"]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_async_client_generates_reports_progress_and_cancels(stack):
    denoiser = stack.services["z-image", "denoiser"]
    cancelled_before = denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled")

    async def scenario():
        async with AsyncImageClient(stack.gateway.address, api_key=API_KEY, timeout=60) as client:
            steps = []
            result = await client.generate(
                "async", steps=2, seed=3, output_format="npy", progress=lambda p: steps.append(p.step), **SIZE
            )
            with pytest.raises(InvalidArgumentError) as caught:
                await client.generate("async", steps=2, **SIZE | {"width": 20})
            started = asyncio.Event()
            options = dict(model="z-image", seed=1, progress=lambda p: p.stage == "denoising" and started.set())
            task = asyncio.create_task(client.generate("a long job", **options, **LONG_JOB))
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()  # cancelling the awaiting task cancels the request on the server
            with pytest.raises(asyncio.CancelledError):
                await task
            return result, steps, caught.value

    result, steps, invalid = asyncio.run(scenario())
    with stack.client() as client:
        expected = client.generate("async", steps=2, seed=3, output_format="npy", **SIZE).array
    assert np.array_equal(result.array, expected) and max(steps) == 2
    assert invalid.field == "width"
    _wait_for(lambda: denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled") == cancelled_before + 1)
