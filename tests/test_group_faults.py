"""A denoiser process group inside the service fails fast, and drains.

* A rank that crashes mid-job: rank 0 answers the in-flight job UNAVAILABLE (GROUP_FAILED), reports NOT_SERVING
  and exits non-zero at once; the gateway's caller, waiting within its deadline, gets its image from the
  replica that replaces it.
* A rank that hangs mid-job: the same, within --collective-timeout.
* A malformed job is refused on rank 0 (INVALID_ARGUMENT) and the group goes on serving; SIGTERM under
  torchrun (which signals every rank) lets the in-flight job finish, exactly, before every rank exits.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen_client.sdk import ImageClient

from imagegen.common.checkpoint import open_model_folder
from imagegen.common.denoise import DenoiseJob
from imagegen.common.families import get_family
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline, resolve_for
from imagegen.common.serving.convert import resolved_to_proto
from imagegen.common.serving.status import GROUP_FAILED, parse_error
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.common.wire import LATENTS, pack, unpack
from imagegen.v1 import denoiser_pb2, denoiser_pb2_grpc, encoder_pb2
from tests.service_harness import TORCH_THREADS, Service, TorchrunService, service_env, stop_all

MODEL = "qwen-image"
COLLECTIVE_TIMEOUT = 10.0
SIZE = dict(width=64, height=64)


def _model_args(*extra: str) -> list[str]:
    return ["--model", str(tiny_checkpoint_cached(MODEL)), "--model-id", MODEL, *extra]


def _faulty(fault: str) -> dict[str, str]:
    return service_env(IMAGEGEN_FAULT_INJECT=f"1:2:{fault}", IMAGEGEN_TESTING="1")


class HealthWatch(threading.Thread):
    """Every status a service's health Watch stream reports, until the stream ends."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.statuses: list[int] = []
        self.watching = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
            try:
                for reply in stream:
                    self.statuses.append(reply.status)
                    self.watching.set()
            except grpc.RpcError:
                pass


def _job(steps: int, cfg: bool = False) -> tuple[DenoiseJob, denoiser_pb2.DenoiseRequest]:
    """A text-to-image job with random prompt embeddings of the tiny model's width, and its request."""
    generator = torch.Generator().manual_seed(3)
    embeds, negative = torch.randn(7, 64, generator=generator), torch.randn(5, 64, generator=generator)
    cfg_options = dict(negative_prompt="blurry", guidance_scale=4.0) if cfg else {}
    resolved = resolve_for(get_family(MODEL), RequestOptions("x", steps=steps, seed=3, **SIZE, **cfg_options), [])
    request = denoiser_pb2.DenoiseRequest(
        options=resolved_to_proto(resolved),
        prompt_embeds=encoder_pb2.Embeddings(safetensors=pack(embeds, "embeds")),
        progress=True,
    )
    if cfg:
        request.negative_embeds.safetensors = pack(negative, "embeds")
    return DenoiseJob(resolved, embeds, negative if cfg else None), request


def _denoise(address: str, request, timeout: float = 120):
    channel = grpc.insecure_channel(address)
    return channel, denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=timeout)


def _one_process(job: DenoiseJob) -> torch.Tensor:
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        folder = open_model_folder(tiny_checkpoint_cached(MODEL))
        return get_family(MODEL).denoiser(folder, torch.float32, "cpu").run(job)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("group-fault-logs")


def test_crashed_rank_fails_the_replica_and_the_gateway_caller_still_gets_its_image(logs):
    args = _model_args("--sp", "2", "--collective-timeout", str(COLLECTIVE_TIMEOUT))
    processes = {
        "encoder": Service("encoder", "encoder", _model_args(), logs),
        "vae": Service("vae", "vae", _model_args(), logs),
        "denoiser": Service("denoiser", "denoiser", args, logs, env=_faulty("crash")),
    }
    try:
        for service in processes.values():
            service.wait_serving(timeout=180)
        denoiser = processes["denoiser"]
        backends = [f"--{name}={service.address}" for name, service in processes.items()]
        gateway = processes["gateway"] = Service("gateway", "gateway", backends, logs)
        gateway.wait_serving()
        watch = HealthWatch(denoiser.address)
        watch.start()
        assert watch.watching.wait(10)

        outcome: dict = {}

        def call() -> None:
            with ImageClient(gateway.address, timeout=180) as client:
                outcome["result"] = client.generate("a harbour", steps=4, seed=7, output_format="npy", **SIZE)

        caller = threading.Thread(target=call)
        start = time.monotonic()
        caller.start()
        code = denoiser.proc.wait(60)
        exited_after = time.monotonic() - start
        assert code not in (0, None), denoiser.log()[-3000:]
        assert exited_after < COLLECTIVE_TIMEOUT, f"a crashed rank should fail the group at once ({exited_after:.1f}s)"
        watch.join(10)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in watch.statuses[watch.statuses.index(1) :]
        log = denoiser.log()
        assert '"method": "Denoise", "code": "UNAVAILABLE"' in log and "denoiser group failed" in log
        assert caller.is_alive(), "the caller should be waiting for a denoiser, within its deadline"

        denoiser.restart(env=service_env())  # the supervisor starts a healthy replica on the same address
        denoiser.wait_serving(timeout=180)
        caller.join(180)
        expected = Pipeline(tiny_checkpoint_cached(MODEL))
        previous = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        try:
            reference = expected(RequestOptions("a harbour", steps=4, seed=7, **SIZE))
        finally:
            torch.set_num_threads(previous)
        assert float(np.abs(outcome["result"].array - reference).max()) <= 1e-6
    finally:
        stop_all(list(processes.values()))


def test_hung_rank_fails_the_replica_within_the_collective_timeout(logs):
    args = _model_args("--sp", "2", "--collective-timeout", str(COLLECTIVE_TIMEOUT))
    denoiser = Service("denoiser-hang", "denoiser", args, logs, env=_faulty("hang"))
    try:
        denoiser.wait_serving(timeout=180)
        _, request = _job(steps=6)
        channel, call = _denoise(denoiser.address, request)
        with channel:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                for _event in call:
                    pass
            answered = time.monotonic() - start
        details = parse_error(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, GROUP_FAILED), details
        code = denoiser.proc.wait(30)
        exited = time.monotonic() - start
        assert code not in (0, None)
        assert answered < COLLECTIVE_TIMEOUT + 10 and exited < COLLECTIVE_TIMEOUT + 15, (answered, exited)
    finally:
        stop_all([denoiser])


def test_torchrun_group_refuses_bad_jobs_and_drains_on_sigterm(logs):
    denoiser = TorchrunService("denoiser-torchrun", 2, _model_args("--cfg-parallel"), logs)
    try:
        denoiser.wait_serving(timeout=180)
        # Malformed: embeddings of the wrong width. Refused on rank 0, before anything is broadcast.
        job, request = _job(steps=30, cfg=True)
        bad = denoiser_pb2.DenoiseRequest()
        bad.CopyFrom(request)
        bad.prompt_embeds.safetensors = pack(torch.zeros(7, 65), "embeds")
        channel, call = _denoise(denoiser.address, bad)
        with channel, pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert parse_error(caught.value).field_violations[0][0] == "prompt_embeds"

        # A CFG job (both ranks work on it), SIGTERMed after its second step: it finishes, exactly.
        channel, call = _denoise(denoiser.address, request)
        with channel:
            latents = None
            for event in call:
                if event.HasField("progress") and event.progress.step == 2:
                    denoiser.terminate()  # torchrun forwards it to both ranks
                if event.HasField("latents"):
                    latents = unpack(event.latents, LATENTS, "latents")
        assert latents is not None, "the in-flight job did not finish"
        denoiser.proc.wait(60)
        lines = [json.loads(line) for line in denoiser.log().splitlines() if line.startswith("{")]
        assert any(line["message"] == "stopped" and line.get("exit_code") == 0 for line in lines)
        assert "following rank 0 until it stops the group" in denoiser.log()
        assert float((latents - _one_process(job)).abs().max()) <= 1e-6
    finally:
        stop_all([denoiser])
