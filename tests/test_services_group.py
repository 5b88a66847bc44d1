"""The denoiser service hosting a process group: rank 0 serves gRPC, the other ranks follow it.

Three denoisers of one tiny Qwen-Image checkpoint sit behind one gateway: one spawns its sequence-parallel
group itself (`serve denoiser --sp 2 --ulysses 1`: a ring of two), two are started by torchrun as the Helm
chart does (`torchrun --nproc-per-node=2 ... serve denoiser --cfg-parallel`, and `... --sp 2 --ulysses 1`: a
layout other than the model's default U = 2, which every follower must take from rank 0's flags too). All must
give the one-process image, and a cancelled stream must stop the whole group at a step boundary with the next
request still exact.
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
import torch
from imagegen_client.sdk import ImageClient

from imagegen.common.denoise import StepHooks
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc
from tests.service_harness import TORCH_THREADS, Service, TorchrunService, stop_all

MODEL = "qwen-image"
REQUEST = dict(negative_prompt="blurry", guidance_scale=4.0, steps=3, width=128, height=128)
TOLERANCE = 1e-6  # against our own one-process run (the parallel parity bound)
ROUTES = ("sp2", "cfg2", "ring2")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    logs = tmp_path_factory.mktemp("group-logs")
    model = ["--model", str(tiny_checkpoint_cached(MODEL)), "--model-id", MODEL]
    services = {
        "encoder": Service("encoder", "encoder", model, logs),
        "vae": Service("vae", "vae", model, logs),
        # --ulysses 1: the two ranks are a ring (issue 13); IMAGEGEN_ULYSSES reaches the service as a flag.
        "sp2": Service("denoiser-sp2", "denoiser", [*model, "--sp", "2", "--ulysses", "1"], logs),
        "cfg2": TorchrunService("denoiser-cfg2", 2, [*model, "--cfg-parallel"], logs),
        # A follower that built the default layout (U = 2) would not join rank 0's ring groups: the short
        # collective timeout makes that a quick start-up failure instead of a hang.
        "ring2": TorchrunService(
            "denoiser-ring2", 2, [*model, "--sp", "2", "--ulysses", "1", "--collective-timeout", "30"], logs
        ),
    }
    try:
        for service in services.values():
            service.wait_serving(timeout=180)
        routes = {
            name: {
                "encoder": services["encoder"].address,
                "vae": services["vae"].address,
                "denoiser": services[name].address,
            }
            for name in ROUTES
        }
        gw = Service("gateway", "gateway", ["--routes", json.dumps(routes), "--default-model", "sp2"], logs)
        services["gateway"] = gw
        gw.wait_serving()
        yield gw, services
    finally:
        stop_all(list(services.values()))


@pytest.fixture(scope="module")
def one_process():
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    pipeline = Pipeline(tiny_checkpoint_cached(MODEL))

    def run(prompt: str, seed: int, **overrides) -> np.ndarray:
        options = RequestOptions(prompt, seed=seed, **{**REQUEST, **overrides})
        return pipeline(options, (), StepHooks())

    yield run
    torch.set_num_threads(previous)


@pytest.mark.parametrize("route", ROUTES)
def test_group_denoiser_equals_one_process(gateway, one_process, route: str) -> None:
    gw, services = gateway
    with ImageClient(gw.address, timeout=180) as client:
        result = client.generate("a harbour at dusk", model=route, seed=7, output_format="npy", **REQUEST)
    expected = one_process("a harbour at dusk", 7)
    assert result.array.shape == expected.shape
    assert float(np.abs(result.array - expected).max()) <= TOLERANCE
    if route == "ring2":  # both ranks built the layout asked for, not the model's default
        assert _layouts(services[route]) == {0: "1x2 (ulysses x ring)", 1: "1x2 (ulysses x ring)"}


def _layouts(service) -> dict[int, str]:
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    return {line["rank"]: line["layout"] for line in lines if line["message"] == "joined the denoiser group"}


def test_cancel_stops_the_group_and_the_next_request_is_exact(gateway, one_process) -> None:
    gw, services = gateway
    denoiser = services["sp2"]
    cancelled_before = denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled")
    long_job = image_service_pb2.GenerateImageRequest(
        model="sp2", prompt="long", seed=1, width=256, height=256, steps=200, output_format=common_pb2.OUTPUT_FORMAT_NPY
    )
    with grpc.insecure_channel(gw.address) as channel:
        call = image_service_pb2_grpc.ImageServiceStub(channel).GenerateImageStream(long_job, timeout=180)
        for event in call:
            if (
                event.HasField("progress")
                and event.progress.stage == common_pb2.STAGE_DENOISING
                and event.progress.step >= 2
            ):
                break
        call.cancel()
    deadline = time.monotonic() + 60
    while denoiser.metric("imagegen_denoise_jobs_total", outcome="cancelled") <= cancelled_before:
        assert time.monotonic() < deadline, "the group did not stop"
        time.sleep(0.1)
    test_group_denoiser_equals_one_process(gateway, one_process, "sp2")
    assert denoiser.alive()
