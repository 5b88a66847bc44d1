"""Batching: compatible requests share one denoiser forward per step, and each image is the one it gets alone.

Exactness on the CPU in float32 (the contract of issue 10): every member of a batch (different prompt lengths,
seeds, guidance scales and num_images, CFG on) equals its own unbatched run to max |diff| <= 1e-6, on the
reference and the fast kernel path, in one process and under `--sp 2`; a batch of one is the unbatched path; a
member that is cancelled mid-batch stops alone and the others still equal their runs alone. Every comparison is
against runs made in this session.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from torch._dynamo.utils import counters

from imagegen.common import kernels
from imagegen.common.batching import batch_key
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.errors import Cancelled
from imagegen.common.options import RequestOptions
from imagegen.common.parallel.launch import local_group
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.pipeline import Pipeline
from imagegen.common.serving.jobs import Batching, JobQueue
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import LONG_NEGATIVE, THREADS, max_diff

TOLERANCE = 1e-6
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("parity_threads")


# Members of one batch per family: prompts and negatives of different token lengths (Z-Image's pad to
# different multiples of 32), other seeds, guidance scales and num_images. Every text is >= 12 tokens: below 12
# rows MKL's sgemm switches summation order with the row count (a property of the BLAS, as in test_parallel).
FOX = "a red fox jumping over a frozen river at dawn, soft light"
LIGHTHOUSE = "a lighthouse on a cliff above a stormy sea at night, oil painting with heavy brush strokes"
NEGATIVE = "blurry, low quality, jpeg artifacts, watermark"
QWEN = [
    RequestOptions(FOX, negative_prompt=NEGATIVE, guidance_scale=4.0, seed=1),
    RequestOptions(LIGHTHOUSE, negative_prompt=LONG_NEGATIVE, guidance_scale=2.5, seed=2, num_images=2),
    RequestOptions(FOX + ", wide angle", negative_prompt=NEGATIVE + ", noisy, grainy", guidance_scale=6.0, seed=3),
]
Z_IMAGE = [
    RequestOptions(FOX, negative_prompt=LONG_NEGATIVE, guidance_scale=5.0, cfg_normalization=1.0, seed=4),
    RequestOptions(LIGHTHOUSE, negative_prompt=NEGATIVE, guidance_scale=3.0, seed=5, num_images=2),
    RequestOptions(LIGHTHOUSE + " " + LONG_NEGATIVE, negative_prompt=NEGATIVE, guidance_scale=7.0, seed=6),
]
SIZES = {"qwen-image": (64, 64), "z-image": (64, 48)}
MEMBERS = {"qwen-image": QWEN, "z-image": Z_IMAGE}

_pipelines: dict[tuple[str, str], Pipeline] = {}
_jobs: dict[tuple, list[DenoiseJob]] = {}


def pipeline(family: str, kernels: str = "reference") -> Pipeline:
    if (family, kernels) not in _pipelines:
        _pipelines[(family, kernels)] = Pipeline(tiny_checkpoint_cached(family), kernels=kernels)
    return _pipelines[(family, kernels)]


def jobs(family: str, size: tuple[int, int] | None = None, steps: int = 3) -> list[DenoiseJob]:
    """The family's batch members, encoded once per session and size."""
    width, height = size or SIZES[family]
    if (family, width, height) not in _jobs:
        pipe = pipeline(family)
        _jobs[(family, width, height)] = [
            pipe.job(pipe.resolve(dataclasses.replace(o, width=width, height=height, steps=steps)))
            for o in MEMBERS[family]
        ]
    return _jobs[(family, width, height)]


def image(family: str, job: DenoiseJob, latents: torch.Tensor) -> np.ndarray:
    """The decoded images `[K, H, W, 3]` in [0, 1]: the contract is on what the caller receives."""
    return pipeline(family).decode(latents, job)


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_batch_members_equal_their_runs_alone(family: str, kernels: str) -> None:
    members = jobs(family)
    assert len({batch_key(j) for j in members}) == 1
    assert len({j.prompt_embeds.shape[0] for j in members}) == len(members)  # really different lengths
    denoiser = pipeline(family, kernels).denoiser
    batched = denoiser.run_batch(members, [StepHooks() for _ in members])
    for index, (job, result) in enumerate(zip(members, batched, strict=True)):
        single = denoiser.run(job, StepHooks())
        assert result.shape == single.shape
        diff = max_diff(image(family, job, result), image(family, job, single))
        assert diff <= TOLERANCE, f"{family} {kernels} member {index}: max |diff| {diff:.3g}"


def stop_after(steps: int) -> StepHooks:
    """Hooks of a caller that cancels once `steps` steps are done (checked before the next one)."""
    done = []
    return StepHooks(on_step=lambda step, total: done.append(step), should_stop=lambda: len(done) >= steps)


def assert_members_exact(family: str, members, results, singles, cancelled: int | None = None) -> None:
    for index, (job, result, single) in enumerate(zip(members, results, singles, strict=True)):
        if index == cancelled:
            assert isinstance(result, Cancelled), f"member {index} was not stopped: {type(result)}"
            assert "before step 2 of 3" in str(result)
            continue
        diff = max_diff(image(family, job, result), image(family, job, single))
        assert diff <= TOLERANCE, f"{family} member {index}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_cancelled_member_stops_alone(kernels: str) -> None:
    """A member that leaves after step 1 gets `Cancelled`; the others (whose batch shrinks mid-loop) finish
    with their exact images, and each member's progress is its own."""
    family = "qwen-image"
    members = jobs(family)
    denoiser = pipeline(family, kernels).denoiser
    steps: list[list[int]] = [[], [], []]
    hooks = [StepHooks(on_step=lambda s, t, i=i: steps[i].append(s)) for i in range(3)]
    hooks[1] = stop_after(1)
    results = denoiser.run_batch(members, hooks)
    assert steps[0] == steps[2] == [1, 2, 3]
    assert_members_exact(family, members, results, [denoiser.run(j) for j in members], cancelled=1)


def test_batch_of_one_is_the_unbatched_run() -> None:
    """`run` is `run_batch` of one, bit for bit, and a job with a stop request raises as before."""
    family = "z-image"
    job = jobs(family)[1]
    denoiser = pipeline(family).denoiser
    assert torch.equal(denoiser.run_batch([job], [StepHooks()])[0], denoiser.run(job))
    with pytest.raises(Cancelled):
        denoiser.run(job, stop_after(1))


def test_incompatible_jobs_refused() -> None:
    qwen = jobs("qwen-image")
    other_size = dataclasses.replace(qwen[0], options=dataclasses.replace(qwen[0].options, width=48, height=80))
    assert batch_key(other_size) != batch_key(qwen[0])
    with pytest.raises(ValueError, match="batch keys"):
        pipeline("qwen-image").denoiser.run_batch([qwen[0], other_size], [StepHooks(), StepHooks()])


# Sizes where every rank of P = 2 holds >= 16 rows (see test_parallel).
SP_SIZES = {"qwen-image": (128, 128), "z-image": (112, 144)}


@pytest.mark.parametrize(
    ("family", "sp", "cfg_parallel"), [("qwen-image", 2, False), ("z-image", 2, False), ("qwen-image", 1, True)]
)
def test_batch_on_a_group(family: str, sp: int, cfg_parallel: bool) -> None:
    """`--sp 2` (and `--cfg-parallel`): rank 0 broadcasts the batch, every rank runs it, each member's stop
    decision is rank 0's; the members equal their runs alone on the same group and the cancelled one stops
    alone."""
    members = jobs(family, SP_SIZES[family])
    spec = GroupSpec(tiny_checkpoint_cached(family), sp, cfg_parallel, threads=THREADS, timeout_s=120)
    with local_group(spec) as group:
        results = group.run_batch(members, [StepHooks(), StepHooks(), stop_after(1)])
        singles = [group.run(job) for job in members]
    assert_members_exact(family, members, results, singles, cancelled=2)


# --------------------------------------------------------------------------------------------- the job queue
class Recorder:
    """The queue's `run`: records each batch's payloads and runs every member for `steps` steps; a payload
    named in `hold` waits for its event first."""

    def __init__(self, steps: int = 2, step_seconds: float = 0.0, hold: dict[str, threading.Event] | None = None):
        self.batches: list[list[str]] = []
        self.steps, self.step_seconds = steps, step_seconds
        self.hold = hold or {}

    def __call__(self, payloads: list[str], hooks: list[StepHooks]) -> list:
        self.batches.append(list(payloads))
        for payload in payloads:
            if payload in self.hold:
                self.hold[payload].wait(10)
        results: list = [None] * len(payloads)
        for step in range(self.steps):
            for i, h in enumerate(hooks):
                if results[i] is None and h.should_stop():
                    results[i] = Cancelled(f"before step {step + 1}")
            time.sleep(self.step_seconds)
            for i, h in enumerate(hooks):
                if results[i] is None:
                    h.on_step(step + 1, self.steps)
        return [r if r is not None else f"{p}:done" for p, r in zip(payloads, results, strict=True)]


async def _final(ticket) -> object:
    async for event in ticket.events():
        if event.final:
            return event
    raise AssertionError("no final event")


def test_queue_batches_fifo_without_starving() -> None:
    """Batches start at the oldest job and take compatible later ones in order, up to max_size; an
    incompatible job keeps its turn (B, older than D, runs before D); key None never batches; a job alone is
    a batch of one, through the same `run`."""

    async def scenario() -> None:
        release = threading.Event()
        recorder = Recorder(hold={"blocker": release})
        queue = JobQueue(16, recorder, "batch-fifo", Batching(2, 0.0))
        blocker = queue.submit("blocker")
        tickets = {
            name: queue.submit(name, key=key)
            for name, key in [("A", 1), ("B", 2), ("C", 1), ("D", 1), ("E", 2), ("F", None)]
        }
        release.set()
        assert (await _final(blocker)).result == "blocker:done"
        finals = {name: await _final(t) for name, t in tickets.items()}
        assert recorder.batches == [["blocker"], ["A", "C"], ["B", "E"], ["D"], ["F"]]
        assert {n: e.result for n, e in finals.items()} == {n: f"{n}:done" for n in "ABCDEF"}
        assert queue.close(5)

    asyncio.run(scenario())


def test_queue_waits_at_most_batch_wait() -> None:
    """A job arriving within the wait joins the head's batch; the wait never exceeds `wait_s`; with 0 only
    what is already queued batches."""

    async def scenario() -> None:
        recorder = Recorder()
        queue = JobQueue(16, recorder, "batch-wait", Batching(4, 0.4))
        waits_before = _histogram_count("imagegen_denoise_batch_wait_seconds")
        start = time.monotonic()
        first = queue.submit("A", key=1)
        await asyncio.sleep(0.1)
        second = queue.submit("B", key=1)
        assert (await _final(first)).result == "A:done" and (await _final(second)).result == "B:done"
        elapsed = time.monotonic() - start
        assert recorder.batches == [["A", "B"]]
        assert 0.35 <= elapsed < 2.0  # waited for the batch to fill until the 0.4 s limit, not longer
        assert _histogram_count("imagegen_denoise_batch_wait_seconds") == waits_before + 1
        assert queue.close(5)

        immediate = Recorder()
        queue = JobQueue(16, immediate, "batch-no-wait", Batching(4, 0.0))
        start = time.monotonic()
        assert (await _final(queue.submit("C", key=1))).result == "C:done"
        assert time.monotonic() - start < 0.3 and immediate.batches == [["C"]]
        assert queue.close(5)

    asyncio.run(scenario())


def test_queue_member_cancelled_mid_batch_stops_alone() -> None:
    """A member withdrawn while its batch runs stops at the next step; the others finish; each got its own
    progress; a member cancelled before the batch started never runs."""

    async def scenario() -> None:
        release = threading.Event()
        recorder = Recorder(steps=20, step_seconds=0.02, hold={"blocker": release})
        queue = JobQueue(16, recorder, "batch-cancel", Batching(4, 0.0))
        blocker = queue.submit("blocker")
        a, b, c = (queue.submit(n, key=1) for n in "ABC")
        release.set()
        await _final(blocker)
        async for event in b.events():
            if event.kind == "step" and event.step == 2:
                break
        queue.withdraw(b)
        final_a, final_b, final_c = await _final(a), await _final(b), await _final(c)
        assert final_a.result == "A:done" and final_c.result == "C:done"
        assert isinstance(final_b.error, Cancelled)
        assert recorder.batches == [["blocker"], ["A", "B", "C"]]
        assert queue.close(5)

    asyncio.run(scenario())


def _histogram_count(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_count") or 0.0


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_compiled_blocks_serve_every_batch_size(family: str, monkeypatch) -> None:
    """The fast path's compiled stages keep the batch dim dynamic: after a batch of two members, a batch of
    three (more rows, other text lengths) traces nothing new (dynamo's eager backend: the tracing inductor
    sees), and its members still equal their runs alone."""
    monkeypatch.setenv(kernels.COMPILE_BACKEND_ENV, "eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        denoiser = Pipeline(tiny_checkpoint_cached(family), kernels="fast", compile="on").denoiser
        members = jobs(family)
        denoiser.run_batch(members[:2], [StepHooks(), StepHooks()])
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2
        results = denoiser.run_batch(members, [StepHooks() for _ in members])
        assert counters["stats"]["unique_graphs"] == graphs, "another batch size recompiled"
        singles = [pipeline(family, "fast").denoiser.run(j) for j in members]
        assert_members_exact(family, members, results, singles)
    finally:
        torch._dynamo.reset()


def test_gpu_benchmark_smoke() -> None:
    """`bench/batching_gpu.py --smoke`: the GPU benchmark's own code (real gRPC servicer, concurrent callers,
    `--max-batch 1` against batched) on the CPU with the tiny checkpoints; batches form and every batched
    image equals the same request's image alone."""
    command = [sys.executable, "bench/batching_gpu.py", "--smoke", "--workloads", "qwen-image-512,z-image-turbo-512"]
    command += ["--callers", "3", "--requests", "3", "--warm", "3", "--max-batch", "3", "--check", "3"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"workload"')]
    results = [r for r in results if "verdict" in r]
    assert [r["workload"] for r in results] == ["qwen-image-512", "z-image-turbo-512"]
    for r in results:
        assert r["verdict"] == "pass" and r["batched_mean_batch"] > 1 and r["max_abs_diff"] <= TOLERANCE, r


def test_batching_flags_and_defaults(monkeypatch) -> None:
    """`--max-batch` wins; unset it is 1 on the CPU and CUDA_MAX_BATCH on CUDA; the env sets both flags; a
    negative or non-finite wait is refused."""
    from imagegen.services.denoiser_config import default_max_batch
    from imagegen.services.flags import CUDA_MAX_BATCH, denoiser_flags

    def parse(*argv: str):
        parser = argparse.ArgumentParser()
        denoiser_flags(parser)
        return parser.parse_args(list(argv))

    def max_batch(args, device: str) -> int:  # as `DenoiserConfig.from_flags` chooses it
        return args.max_batch or default_max_batch(device)

    monkeypatch.delenv("IMAGEGEN_MAX_BATCH", raising=False)
    monkeypatch.delenv("IMAGEGEN_BATCH_WAIT_MS", raising=False)
    args = parse()
    assert max_batch(args, "cpu") == 1 and max_batch(args, "cuda:0") == CUDA_MAX_BATCH
    assert args.batch_wait_ms == 10.0
    assert max_batch(parse("--max-batch", "3"), "cpu") == 3
    monkeypatch.setenv("IMAGEGEN_MAX_BATCH", "5")
    monkeypatch.setenv("IMAGEGEN_BATCH_WAIT_MS", "0")
    args = parse()
    assert max_batch(args, "cuda") == 5 and args.batch_wait_ms == 0.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse("--batch-wait-ms", bad)
    with pytest.raises(SystemExit):
        parse("--max-batch", "0")


def test_service_caller_leaving_mid_batch() -> None:
    """Through the real `DenoiserServicer` and gRPC: three callers share a batch; one cancels its RPC after
    its first step. Its job stops (counted cancelled) and the two others get exactly the latents they get
    alone."""
    import grpc

    from bench.batching_gpu import WORKLOADS, requests, service_args
    from imagegen.common.families import get_family
    from imagegen.common.serving.convert import resolved_from_proto
    from imagegen.common.serving.hosting import HostedModel
    from imagegen.common.wire import LATENTS, unpack
    from imagegen.services.denoiser import DenoiserServicer
    from imagegen.services.denoiser_config import DenoiserConfig
    from imagegen.v1 import denoiser_pb2_grpc

    workload = WORKLOADS["qwen-image-512"]
    denoiser = pipeline("qwen-image", "fast").denoiser
    folder = pipeline("qwen-image", "fast").folder
    calls = requests(workload, 3, denoiser.dit.transformer.config.joint_attention_dim, 64, 6, torch.float32)
    for call in calls:
        call.progress = True
    args = service_args(folder, workload, 3, 2000.0, True, "off")
    model = HostedModel(folder, get_family("qwen-image"), "tiny", torch.float32, "cpu")
    config = DenoiserConfig.from_flags(args, model)
    cancelled_before = REGISTRY.get_sample_value("imagegen_denoise_jobs_total", {"outcome": "cancelled"}) or 0.0
    batches_before = _histogram_count("imagegen_denoise_batch_size")

    async def scenario() -> list:
        servicer = DenoiserServicer(config, model, stage=denoiser)
        await servicer.prepare()
        server = grpc.aio.server()
        denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)

                async def caller(index: int):
                    call = stub.Denoise(calls[index])
                    async for event in call:
                        if event.WhichOneof("event") == "latents":
                            return unpack(event.latents, LATENTS, "latents")
                        if index == 2 and event.progress.step == 1:
                            call.cancel()
                            return "left"
                    return await call.code()

                return await asyncio.gather(*(caller(i) for i in range(3)))
        finally:
            await server.stop(None)
            await servicer.close()

    first, second, third = asyncio.run(scenario())
    assert third == "left"
    assert _histogram_count("imagegen_denoise_batch_size") == batches_before + 1
    assert REGISTRY.get_sample_value("imagegen_denoise_jobs_total", {"outcome": "cancelled"}) == cancelled_before + 1
    for call, latents in zip(calls[:2], (first, second), strict=True):
        job = DenoiseJob(resolved_from_proto(call.options), unpack(call.prompt_embeds.safetensors, "embeds", "p"))
        job.negative_embeds = unpack(call.negative_embeds.safetensors, "embeds", "n")
        assert max_diff(latents, denoiser.run(job)) <= TOLERANCE
