"""The clients the platform adopts, against served tiny models: the torch-free `imagegen-client` in a fresh venv,
the official `openai` package on the gateway's HTTP port (same images as gRPC for the same seed; errors as
openai's exception classes), and a schemathesis run over /openapi.json that must find no 5xx."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import numpy as np
import openai
import PIL.Image
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen_client import ImageClient
from imagegen_client.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc

from imagegen.common.tiny import tiny_checkpoint_cached
from tests.service_harness import ROOT, Service, free_port, stop_all

API_KEY = "platform-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL = {"size": "64x64", "seed": 11, "num_inference_steps": 2}  # HTTP spelling
SMALL_GRPC = {"width": 64, "height": 64, "seed": 11, "steps": 2}
SMALL_EXTRA = {"seed": 11, "num_inference_steps": 2}  # our options, in openai's extra_body


def _stages() -> list[str]:
    return [f"--{stage}=127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("clients-logs")
    keys = logs / "keys.txt"
    keys.write_text(f"{API_KEY}\n")
    common = ["--api-keys-file", str(keys)] + ["--max-images", "2"]
    # Text to image, with a queue of one behind a long job for the 429 test.
    gen = ["--model", str(tiny_checkpoint_cached("qwen-image")), "--model-id", "tiny-qwen"]
    gen += ["--queue-size", "1", "--max-steps", "1000"]
    # Edits; tight limits, so that what schemathesis generates is either rejected or quick to run.
    edit = ["--model", str(tiny_checkpoint_cached("qwen-image-edit")), "--model-id", "tiny-edit"]
    edit += ["--max-steps", "2", "--max-side", "64", "--max-input-bytes", "65536", "--max-input-pixels", "16384"]
    started = {
        "gen": Service("all-gen", "all", gen + common + _stages(), logs),
        "edit": Service("all-edit", "all", edit + common + _stages(), logs),
    }
    try:
        for server in started.values():
            server.wait_serving()
        yield started
    finally:
        stop_all(list(started.values()))


def _openai(server: Service, **kwargs) -> openai.OpenAI:
    options = {"api_key": API_KEY, "max_retries": 0, "timeout": 120} | kwargs
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", **options)


def _png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _grpc(server: Service) -> ImageClient:
    return ImageClient(server.address, api_key=API_KEY)


# ----------------------------------------------------------------------------------------------------- openai
def test_openai_generate_and_edit_equal_grpc(servers):
    with _grpc(servers["gen"]) as client:
        expected = client.generate("a red fox", **SMALL_GRPC).blobs[0]
    http = _openai(servers["gen"])
    extra = {"seed": SMALL["seed"], "num_inference_steps": SMALL["num_inference_steps"]}
    labels = {"service": "imagegen.v1.ImageService", "method": "GenerateImage", "code": "OK"}
    counted = servers["gen"].metric("imagegen_requests_total", **labels)
    generated = http.images.generate(prompt="a red fox", model="tiny-qwen", size="64x64", extra_body=extra)
    assert generated.data[0].b64_json and generated.size == "64x64"
    # The HTTP request ran through the servicer method a gRPC call runs through: the same metrics count it.
    assert servers["gen"].metric("imagegen_requests_total", **labels) == counted + 1
    assert np.array_equal(_pixels(base64.b64decode(generated.data[0].b64_json)), _pixels(expected))

    image = _png()
    with _grpc(servers["edit"]) as client:
        expected_edit = client.edit([image], "make it blue", **SMALL_GRPC).blobs[0]
    edit = _openai(servers["edit"]).images.edit(
        image=("in.png", image, "image/png"), prompt="make it blue", model="tiny-edit", size="64x64", extra_body=extra
    )
    assert np.array_equal(_pixels(base64.b64decode(edit.data[0].b64_json)), _pixels(expected_edit))
    assert not np.array_equal(_pixels(expected_edit), _pixels(expected))  # two models, two different answers

    models = http.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen"]


def test_openai_stream_sends_progress_then_the_image(servers):
    with _grpc(servers["gen"]) as client:
        expected = client.generate("a stream", **SMALL_GRPC).blobs[0]
    events = list(
        _openai(servers["gen"]).images.generate(
            prompt="a stream",
            size="64x64",
            stream=True,
            partial_images=0,
            extra_body={"seed": 11, "num_inference_steps": 2},
        )
    )
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and "image_generation.partial_image" not in kinds
    steps = [e.step for e in events if e.type == "image_generation.progress" and e.stage == "denoising"]
    assert steps[-1] == 2, kinds  # progress counts the two steps
    assert np.array_equal(_pixels(base64.b64decode(events[-1].b64_json)), _pixels(expected))
    edit_stream = _openai(servers["edit"]).images.edit(
        image=[("a.png", _png(1), "image/png")], prompt="blue", size="64x64", stream=True, extra_body=SMALL_EXTRA
    )
    edit_events = list(edit_stream)
    assert {e.type for e in edit_events[:-1]} == {"image_edit.progress"}
    assert edit_events[-1].type == "image_edit.completed" and edit_events[-1].size == "64x64"


def test_openai_errors_map_to_the_openai_exceptions(servers):
    http = _openai(servers["gen"])
    with pytest.raises(openai.BadRequestError) as bad:
        http.images.generate(prompt="x", size="65x64")
    assert bad.value.body["param"] == "size" and "multiple of 16" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="url is not offered"):
        http.images.generate(prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.NotFoundError) as missing:
        http.images.generate(prompt="x", model="dall-e-3")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _openai(servers["gen"], api_key="wrong-key").images.generate(prompt="x", size="64x64")
    base = f"http://127.0.0.1:{servers['gen'].http_port}"
    no_key = requests.post(f"{base}/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    # The edit server's body limit: 2 images of at most 64 KiB, plus 1 MiB for the rest.
    edit_base = f"http://127.0.0.1:{servers['edit'].http_port}"
    huge = requests.post(f"{edit_base}/v1/images/edits", data=b"-" * (2 << 20), headers=AUTH, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    late = requests.post(
        f"{base}/v1/images/generations",
        json={"prompt": "x", "size": "512x512", "num_inference_steps": 300},
        headers=AUTH | {"X-Request-Timeout": "0.5"},
        timeout=30,
    )
    assert late.status_code == 504, late.text


def test_full_queue_is_a_rate_limit_error_with_retry_after(servers):
    server = servers["gen"]
    channel = grpc.insecure_channel(server.address)
    stub = image_service_pb2_grpc.ImageServiceStub(channel)
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    long = image_service_pb2.GenerateImageRequest(prompt="long", width=512, height=512, steps=300, seed=1)
    with channel:
        running = stub.GenerateImageStream(long, metadata=metadata, timeout=120)
        _wait_stage(running, common_pb2.STAGE_DENOISING)
        waiting = stub.GenerateImageStream(long, metadata=metadata, timeout=120)
        _wait_stage(waiting, common_pb2.STAGE_QUEUED)
        try:
            with pytest.raises(openai.RateLimitError) as limited:
                _openai(server).images.generate(prompt="one too many", size="64x64")
            assert int(limited.value.response.headers["retry-after"]) >= 1
            assert limited.value.code == "queue_full"
        finally:
            waiting.cancel()
            running.cancel()


# ------------------------------------------------------------------------------------------ callers who leave
LONG_HTTP = {"prompt": "nobody waits", "size": "512x512", "num_inference_steps": 1000, "seed": 3}
LEAVING = {  # entry -> the ImageService method that serves it
    "http": "GenerateImage",
    "http-stream": "GenerateImageStream",
    "grpc": "GenerateImage",
    "grpc-stream": "GenerateImageStream",
}


@contextlib.contextmanager
def _leaving_caller(server: Service, entry: str):
    """A long request on `entry`, in flight while the block runs; the caller goes away when it ends: an HTTP
    client closes its connection, a gRPC client cancels its call."""
    if entry.startswith("http"):
        body = json.dumps({**LONG_HTTP, "stream": entry == "http-stream"}).encode()
        head = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(head.encode() + body)
            yield
        return
    long = image_service_pb2.GenerateImageRequest(prompt="nobody waits", width=512, height=512, steps=1000, seed=3)
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    with grpc.insecure_channel(server.address) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        if entry == "grpc":
            call = stub.GenerateImage.future(long, metadata=metadata, timeout=120)
        else:
            call = stub.GenerateImageStream(long, metadata=metadata, timeout=120)
        yield
        call.cancel()


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("entry", list(LEAVING))
def test_a_caller_who_leaves_frees_the_denoiser_within_a_step(servers, entry):
    """Every public entry: once its caller has gone, the job stops before its next step (it would run 1000) and
    the request is recorded CANCELLED; the next caller is served at once."""
    server = servers["gen"]
    labels = {"service": "imagegen.v1.ImageService", "method": LEAVING[entry], "code": "CANCELLED"}
    requests_cancelled = server.metric("imagegen_requests_total", **labels)
    jobs_cancelled = server.metric("imagegen_denoise_jobs_total", outcome="cancelled")
    steps = server.metric("imagegen_denoise_steps_total")
    with _leaving_caller(server, entry):
        _wait_for(lambda: server.metric("imagegen_denoise_steps_total") >= steps + 2)  # denoising
        left_at = server.metric("imagegen_denoise_steps_total")
    _wait_for(lambda: server.metric("imagegen_denoise_jobs_total", outcome="cancelled") == jobs_cancelled + 1, 10)
    # The step running when the caller left may finish; no further step starts.
    assert server.metric("imagegen_denoise_steps_total") - left_at <= 2
    _wait_for(lambda: server.metric("imagegen_requests_total", **labels) == requests_cancelled + 1, 10)
    start = time.monotonic()
    with _grpc(server) as client:
        client.generate("the next caller", **SMALL_GRPC)
    assert time.monotonic() - start < 10


def _wait_stage(events, stage: int) -> None:
    for event in events:
        if event.HasField("progress") and event.progress.stage == stage:
            return
    raise AssertionError(f"stream ended before stage {stage}")


# ---------------------------------------------------------------------------------------------- schemathesis
def test_openapi_fuzz_finds_no_server_error(servers):
    base = f"http://127.0.0.1:{servers['edit'].http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH)  # behind the key (issue 20)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/v1/images/edits", "/v1/models"}
    seen: dict[str, set[int]] = {}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=st.sampled_from(operations).flatmap(lambda operation: operation.as_strategy()))
    def call(case):
        response = case.call(base_url=base, headers=AUTH, timeout=60)
        seen.setdefault(case.operation.path, set()).add(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

    for _ in operations:  # each run draws from every operation; a few runs spread the examples over them
        call()
    assert any(status < 300 for status in seen["/v1/models"])


# -------------------------------------------------------------------------------------------- torch-free SDK
_SDK_SCRIPT = """
import sys
from imagegen_client import ImageClient
gen, edit, key, image, out = sys.argv[1:]
with ImageClient(gen, api_key=key) as client:
    open(out + ".gen.png", "wb").write(client.generate("a red fox", width=64, height=64, seed=11, steps=2).blobs[0])
with ImageClient(edit, api_key=key) as client:
    result = client.edit([image], "make it blue", width=64, height=64, seed=11, steps=2)
    open(out + ".edit.png", "wb").write(result.blobs[0])
    assert result.array.shape == (1, 64, 64, 3) and result.images[0].size == (64, 64)
print("torch" in sys.modules)
"""


def _floors(tmp_path: Path) -> Path:
    """A constraints file pinning every dependency of the client at its declared floor."""
    project = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        floor = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
        assert floor, f"{requirement}: every dependency needs a floor"
        pins.append(f"{floor[1]}=={floor[2]}")
    path = tmp_path / "floors.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def test_sdk_in_a_fresh_venv_without_torch_at_its_floors(servers, tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # No pip inside (ensurepip is the slow part): this venv's pip installs into it (`pip --python`). At the
    # declared floors, so that the floors are known to work; the main venv runs the newest versions.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check"]
    start = time.monotonic()
    install = [*pip, "install", "-q", "-c", str(_floors(tmp_path)), str(ROOT / "clients" / "python")]
    subprocess.run(install, check=True, env=env, cwd=tmp_path)
    print(f"pip install ./clients/python: {time.monotonic() - start:.1f}s")
    assert subprocess.run([*pip, "show", "torch"], env=env, capture_output=True).returncode != 0
    image = tmp_path / "in.png"
    image.write_bytes(_png())
    out = tmp_path / "out"
    argv = [str(venv / "bin" / "python"), "-c", _SDK_SCRIPT, servers["gen"].address, servers["edit"].address]
    done = subprocess.run([*argv, API_KEY, str(image), str(out)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"  # nothing the SDK imports pulls torch in
    with _grpc(servers["gen"]) as client:
        assert Path(f"{out}.gen.png").read_bytes() == client.generate("a red fox", **SMALL_GRPC).blobs[0]
    with _grpc(servers["edit"]) as client:
        expected = client.edit([image.read_bytes()], "make it blue", **SMALL_GRPC).blobs[0]
        assert Path(f"{out}.edit.png").read_bytes() == expected
