"""One GPU under a real mix of requests: `imagegen serve all` with full-size random-weight modules, concurrent
gRPC (SDK) and HTTP (the official `openai` client) callers, generate and edit, sizes warmed up and not.

Each phase hosts one model behind the CLI's own `serve all` (`imagegen.services.cli.serve`, in this process: the
stages are built from the published configs on the GPU, `bench/e2e_gpu.py`, and handed to the services in place
of loading a folder), sends `distinct x repeats` requests from `--callers` concurrent callers (alternately gRPC
and HTTP; the encoder's embedding cache is off, so every repeat encodes again), then runs each distinct request
alone and checks every image against that one-request result. Printed per phase: every failure with its status,
requests/s, p50/p99 latency per size, the first request of each size that was not warmed up against the same
request once warm (both as the denoiser's own work: from its first denoising step to the answer, so queueing
behind others does not count), whether SDPA's process-wide backend switches ever changed during the load, and
a verdict. On CUDA the fast path's attention kernels are first checked bit for bit against SDPA with that
backend selected.

    python bench/load_gpu.py [--phases qwen-image-fast,qwen-image-edit-fast] [--callers 8]
    python bench/load_gpu.py --smoke     # the same code on the CPU with the tiny checkpoints (CI runs it)

JSON lines on stdout (and `$OUT/load.jsonl` when `$OUT` is set); the exit status is the number of failed verdicts.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import gc
import io
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import PIL.Image
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen_client.errors import ImageServiceError
from imagegen_client.retry import RetryPolicy
from imagegen_client.sdk import ImageClient

from bench.compare import psnr
from imagegen.cli import build_parser
from imagegen.common import kernels
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.serving.hosting import HostedModel
from imagegen.common.tiny import tiny_checkpoint_cached

MIN_PSNR_DB = 35.0  # the fast path's contract; the same request alone should in fact give the same pixels
MAX_FIRST_RATIO = 1.5  # the first request of a size never warmed up, against the same request warm
SWITCHES = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")
PROMPTS = (
    "a red fox standing in fresh snow at dawn, soft golden light",
    "a lighthouse on a cliff above a stormy sea, long exposure, dramatic clouds over the water",
    "an old bookshop interior with warm lamps",
    "a bowl of ramen on a wooden table, steam rising, shallow depth of field, food photography in the evening",
    "a glass greenhouse full of ferns",
    "a city street at night in the rain, neon reflections on wet asphalt, people with umbrellas",
)


@dataclass(frozen=True)
class Phase:
    """One `serve all` of one model: `mix` is (size, distinct requests of that size); each distinct request is
    sent `repeats` times. `warm` sizes are the denoiser's `--warmup-sizes`; the others are met cold."""

    family: str  # tiny checkpoint family (its tokenizer, processor and scheduler config)
    variant: str | None
    kernels: str
    steps: int
    guidance: float
    negative: str | None
    warm: tuple[str, ...]
    mix: tuple[tuple[str, int], ...]
    repeats: int = 4
    input_images: int = 0  # edit: one input image per request

    @property
    def modules(self) -> str:
        return "qwen" if self.family.startswith("qwen") else "z-image"

    def smoke(self) -> Phase:
        """The same phase on the CPU with a tiny checkpoint: 2 steps, 2 sizes (one warm), 2 x 2 requests."""
        warm = ("64x64",) if self.warm else ()
        return dataclasses.replace(self, steps=2, warm=warm, mix=(("64x64", 1), ("48x80", 1)), repeats=2)


QWEN_SIZES = (("512x512", 3), ("768x768", 2), ("1024x1024", 2), ("1536x1024", 1))
Z_SIZES = (("512x512", 3), ("768x768", 3), ("1024x1024", 2), ("1536x1024", 1), ("1024x1536", 1))
# Fewer and smaller sizes for Qwen-Image's reference path, which is ~1.4x slower and never compiles.
QWEN_REFERENCE_SIZES = (("384x384", 3), ("512x512", 4), ("768x768", 3))
WARM = ("512x512", "1024x1024")
PHASES = {
    # 32 generate + 8 edit requests: Qwen-Image 20 steps with true CFG, then Edit-Plus on the same modules.
    "qwen-image-fast": Phase("qwen-image", None, "fast", 20, 4.0, " ", WARM, QWEN_SIZES),
    "qwen-image-edit-fast": Phase(
        "qwen-image-edit-plus", None, "fast", 20, 4.0, " ", ("512x512",), (("512x512", 1), ("768x768", 1)),
        input_images=1,
    ),  # fmt: skip
    "z-image-turbo-fast": Phase("z-image", "turbo", "fast", 8, 0.0, None, WARM, Z_SIZES),
    "z-image-turbo-reference": Phase("z-image", "turbo", "reference", 8, 0.0, None, (), Z_SIZES),
    "qwen-image-reference": Phase("qwen-image", None, "reference", 20, 4.0, " ", (), QWEN_REFERENCE_SIZES),
    "qwen-image-edit-reference": Phase(
        "qwen-image-edit-plus", None, "reference", 20, 4.0, " ", (), (("512x512", 1),), input_images=1
    ),
}
DEFAULT_PHASES = "qwen-image-fast,qwen-image-edit-fast,z-image-turbo-fast,z-image-turbo-reference,qwen-image-reference"
SMOKE_PHASES = "qwen-image-fast,qwen-image-edit-fast,z-image-turbo-reference"


def emit(**fields) -> None:
    line = json.dumps(fields, default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "load.jsonl", "a") as file:
            file.write(line + "\n")


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def size_of(text: str) -> tuple[int, int]:
    width, height = text.split("x")
    return int(width), int(height)


# ------------------------------------------------------------------------------------------- the modules
class Modules:
    """Full-size random-weight modules per family group, built once and shared by that group's phases (both
    kernel paths, generate and edit: Qwen-Image-Edit-Plus has Qwen-Image's architecture)."""

    def __init__(self) -> None:
        self.group: str | None = None
        self.built: dict = {}

    def for_phase(self, phase: Phase) -> dict:
        if self.group != phase.modules:
            self.built.clear()
            gc.collect()
            torch.cuda.empty_cache()
            from bench.e2e_gpu import full_size_modules

            source = "qwen-image-edit-plus" if phase.modules == "qwen" else "z-image"
            start = time.perf_counter()
            built = full_size_modules(phase.family, open_model_folder(tiny_checkpoint_cached(source)))
            built.pop("processors")
            torch.cuda.synchronize()
            self.group, self.built = phase.modules, built
            emit(built=phase.modules, seconds=round(time.perf_counter() - start, 1))
        modules = dict(self.built)
        if phase.input_images:
            from bench.e2e_gpu import widen_vision_processor

            modules["processor"] = widen_vision_processor(open_model_folder(tiny_checkpoint_cached(phase.family)))
        return modules


def check_kernels(device: str) -> list[str]:
    """Each attention kernel the fast path may choose, called by its op, against SDPA with that backend selected
    (single-threaded: the one place the switches may be flipped): bit for bit, at DiT shapes. Failures."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(1, 4096 + 77, 24, 128), (2, 1024 + 40, 30, 128), (1, 333, 8, 76)]
        pairs = [(kernels.CUDNN, SDPBackend.CUDNN_ATTENTION), (kernels.FLASH, SDPBackend.FLASH_ATTENTION)]
        pairs.append((kernels.EFFICIENT, SDPBackend.EFFICIENT_ATTENTION))
    else:
        dtype, shapes = torch.float32, [(1, 90, 4, 32)]
        pairs = [(kernels.CPU_FLASH, SDPBackend.FLASH_ATTENTION), (kernels.MATH, SDPBackend.MATH)]
    failures = []
    for shape in shapes:
        q, k, v = (torch.randn(shape, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        for kernel, backend in pairs:
            if not kernel.usable(q, k, v):
                emit(kernel=kernel.name, shape=shape, usable=False)
                continue
            try:
                with sdpa_kernel([backend]):
                    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                equal = torch.equal(kernel.run(q, k, v), want)
            except RuntimeError as exc:
                emit(kernel=kernel.name, shape=shape, error=str(exc)[:300])
                failures.append(f"{kernel.name} {shape}: {exc}"[:300])
                continue
            emit(kernel=kernel.name, shape=shape, equal_to_sdpa=equal)
            if not equal:
                failures.append(f"{kernel.name} {shape} differs from SDPA")
    return failures


# ------------------------------------------------------------------------------------------------ serving
class ServeAll:
    """`imagegen serve all` (the CLI's `serve`) on the main thread, with the prebuilt modules as its model."""

    def __init__(self, phase: Phase, name: str, modules: dict | None, device: str, compile: str) -> None:
        self.tiny = tiny_checkpoint_cached(phase.family, phase.variant)
        self.name = name
        self.port, self.http_port = free_port(), free_port()
        self.stages = {stage: free_port() for stage in ("encoder", "denoiser", "vae")}
        argv = ["serve", "all", "--model", str(self.tiny), "--model-id", name, "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--http-port", str(self.http_port), "--metrics-port", "0"]
        argv += [f"--{stage}=127.0.0.1:{port}" for stage, port in self.stages.items()]
        argv += ["--device", device, "--dtype", "bfloat16" if device == "cuda" else "float32"]
        argv += ["--kernels", phase.kernels, "--compile", compile, "--warmup-sizes", ",".join(phase.warm) or "none"]
        argv += ["--queue-size", "256", "--cache-bytes", "0", "--log-level", "warning", "--default-timeout", "1800"]
        if device == "cpu":
            argv += ["--torch-threads", "2"]
        self.args = build_parser().parse_args(argv)
        self.modules = modules

    def run(self, drive) -> tuple[int, object]:
        """Serve until `drive(self)` (on another thread) returns; (serve's exit status, what `drive` returned)."""
        from imagegen.services.cli import serve

        original = HostedModel.__dict__["from_args"]  # the classmethod itself, put back afterwards
        modules = self.modules

        def prebuilt(cls, args):
            model = original.__func__(cls, args)
            return model if modules is None else dataclasses.replace(model, folder=model.folder.with_modules(modules))

        outcome: dict = {}

        def driver() -> None:
            try:
                outcome["value"] = drive(self)
            except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
                outcome["error"] = exc
            finally:
                if not self.stopped.is_set():
                    os.kill(os.getpid(), signal.SIGTERM)  # serve's own drain and shutdown

        self.stopped = threading.Event()
        HostedModel.from_args = classmethod(prebuilt)
        thread = threading.Thread(target=driver, name="load-driver")
        try:
            thread.start()
            code = serve(self.args)
        finally:
            self.stopped.set()
            HostedModel.from_args = original
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return code, outcome.get("value")

    def wait_serving(self, timeout: float = 1500) -> float:
        """Every endpoint SERVING (the denoiser after its warm-up); seconds waited."""
        start = time.perf_counter()
        addresses = [f"127.0.0.1:{self.port}", *(f"127.0.0.1:{p}" for p in self.stages.values())]
        while time.perf_counter() - start < timeout and not self.stopped.is_set():
            if all(self._serving(address) for address in addresses):
                return time.perf_counter() - start
            time.sleep(0.5)
        raise TimeoutError(f"serve all not SERVING after {time.perf_counter() - start:.0f} s")

    @staticmethod
    def _serving(address: str) -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    index: int
    distinct: int  # which distinct request this is a repeat of
    size: str
    cold: bool
    transport: str  # "grpc" or "http"
    prompt: str
    seed: int


@dataclass
class Outcome:
    request: Request
    started_at: float = 0.0
    latency_s: float = 0.0
    queued_at: float | None = None  # when it reached the denoiser (gRPC: its first progress event from there)
    denoising_at: float | None = None  # its first denoising step
    work_s: float | None = None  # first denoising step -> answer: the denoiser's own work, without queueing
    image: np.ndarray | None = None
    error: str | None = None


def plan(phase: Phase) -> list[Request]:
    """The load, in the order callers take it: one distinct request of each size, the other distinct ones, then
    rounds of repeats. Every distinct request's first send is gRPC (its progress gives the denoiser's own work);
    its repeats alternate between HTTP and gRPC from round to round."""
    sizes = [size for size, count in phase.mix for _ in range(count)]
    firsts = [sizes.index(size) for size, _ in phase.mix]
    rounds = [firsts + [d for d in range(len(sizes)) if d not in firsts]]
    rounds += [list(range(len(sizes))) for _ in range(phase.repeats - 1)]
    requests = []
    for number, order in enumerate(rounds):
        for d in order:
            transport = "grpc" if number == 0 or (number + d) % 2 == 0 else "http"
            prompt = f"{PROMPTS[d % len(PROMPTS)]} (scene {d})"
            cold = sizes[d] not in phase.warm
            requests.append(Request(len(requests), d, sizes[d], cold, transport, prompt, 1000 + d))
    return requests


class Callers:
    """Sends requests as a platform's callers do, without retries (every failure is counted). The first request
    of each size not warmed up goes first: the others of that size wait until it has reached the denoiser (its
    first progress event there), so it is the one that meets the size cold."""

    def __init__(self, server: ServeAll, phase: Phase, input_image: bytes | None, load: list[Request]) -> None:
        import openai

        self.phase = phase
        self.model = server.name
        self.input_image = input_image
        self.grpc_target = f"127.0.0.1:{server.port}"
        self.http = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0, timeout=1800
        )
        self.probes = {}
        for request in load:
            if request.cold and request.size not in self.probes:
                self.probes[request.size] = request.index
        self.gates = {size: threading.Event() for size in self.probes}

    def options(self, request: Request) -> dict:
        width, height = size_of(request.size)
        options = dict(width=width, height=height, steps=self.phase.steps, seed=request.seed, output_format="png")
        options["guidance_scale"] = self.phase.guidance
        if self.phase.negative is not None:
            options["negative_prompt"] = self.phase.negative
        return options

    def run(self, request: Request) -> Outcome:
        probe = self.probes.get(request.size) == request.index
        if request.cold and not probe:
            self.gates[request.size].wait(1800)
        outcome = Outcome(request, started_at=time.perf_counter())
        try:
            send = self._grpc if request.transport == "grpc" else self._http
            blob = send(request, outcome, self.gates[request.size] if probe else None)
            outcome.latency_s = time.perf_counter() - outcome.started_at
            with PIL.Image.open(io.BytesIO(blob)) as image:
                outcome.image = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except ImageServiceError as exc:
            outcome.error = f"gRPC {exc.code.name}: {exc.message[:300]}"
        except Exception as exc:  # noqa: BLE001 - every failure is counted with its status
            status = getattr(exc, "status_code", None)
            outcome.error = f"{'HTTP ' + str(status) if status else type(exc).__name__}: {str(exc)[:300]}"
        finally:
            if probe:
                self.gates[request.size].set()  # never keep the others waiting, even after a failure
        if outcome.error:
            outcome.latency_s = time.perf_counter() - outcome.started_at
        return outcome

    def _grpc(self, request: Request, outcome: Outcome, gate: threading.Event | None) -> bytes:
        def progress(event) -> None:
            now = time.perf_counter()
            if event.stage in ("queued", "denoising") and outcome.queued_at is None:
                outcome.queued_at = now
                if gate is not None:
                    gate.set()
            if event.stage == "denoising" and outcome.denoising_at is None:
                outcome.denoising_at = now

        options = self.options(request) | {"model": self.model}
        with ImageClient(self.grpc_target, timeout=1800, retry=RetryPolicy(attempts=1)) as client:
            if self.input_image is None:
                result = client.generate(request.prompt, progress=progress, **options)
            else:
                result = client.edit([self.input_image], request.prompt, progress=progress, **options)
        if outcome.denoising_at is not None:
            outcome.work_s = time.perf_counter() - outcome.denoising_at
        return result.blobs[0]

    def _http(self, request: Request, outcome: Outcome, gate: threading.Event | None) -> bytes:
        options = self.options(request)
        extra = {"seed": options["seed"], "num_inference_steps": options["steps"]}
        extra["guidance_scale"] = options["guidance_scale"]
        if "negative_prompt" in options:
            extra["negative_prompt"] = options["negative_prompt"]
        common = dict(prompt=request.prompt, model=self.model, size=request.size, extra_body=extra)
        if self.input_image is None:
            response = self.http.images.generate(**common)
        else:
            response = self.http.images.edit(image=("input.png", self.input_image, "image/png"), **common)
        return base64.b64decode(response.data[0].b64_json)


class SwitchWatch:
    """Samples SDPA's process-wide backend switches on its own thread while the load runs."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, ...]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="sdpa-switches", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.seen.add(tuple(getattr(torch.backends.cuda, name)() for name in SWITCHES))
            time.sleep(0.002)

    def __enter__(self) -> SwitchWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def input_png(size: int) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ a phase
def drive(server: ServeAll, phase: Phase, callers: int, smoke: bool) -> dict:
    ready_s = server.wait_serving()
    load = plan(phase)
    people = Callers(server, phase, input_png(48 if smoke else 512) if phase.input_images else None, load)
    initial = tuple(getattr(torch.backends.cuda, name)() for name in SWITCHES)
    start = time.perf_counter()
    with SwitchWatch() as watch, concurrent.futures.ThreadPoolExecutor(callers) as pool:
        outcomes = list(pool.map(people.run, load))
    wall = time.perf_counter() - start
    # Each distinct request once more, alone: its one-request image, and its work once warm.
    distinct = {r.distinct: r for r in reversed(load)}
    alone = {d: people.run(dataclasses.replace(r, transport="grpc")) for d, r in sorted(distinct.items())}
    return {"ready_s": ready_s, "wall_s": wall, "outcomes": outcomes, "alone": alone, "switches": watch.seen,
            "initial_switches": initial, "callers": callers}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def first_of_size(size: str, outcomes: list[Outcome], alone: dict[int, Outcome]) -> dict:
    """The first request of a size not warmed up against the same request once warm, each as the denoiser's own
    work (first denoising step -> answer): its repeats in the same load (gRPC ones), and its run alone after."""
    mine = [o for o in outcomes if o.request.size == size]
    first, twin = mine[0], alone.get(mine[0].request.distinct)
    row = {"first_latency_s": first.latency_s, "first_work_s": first.work_s}
    # First in the denoiser's FIFO queue: every other request of the size started denoising after it (gRPC), or
    # was sent after it had reached the denoiser (HTTP).
    def after(o: Outcome) -> bool:
        if o.denoising_at is not None and first.denoising_at is not None:
            return o.denoising_at > first.denoising_at
        return first.queued_at is not None and o.started_at > first.queued_at

    row["first_in_queue"] = first.queued_at is not None and all(after(o) for o in mine[1:])
    repeats = [o.work_s for o in mine[1:] if o.request.distinct == first.request.distinct and o.work_s]
    if repeats and first.work_s:
        row["warm_work_s"] = statistics.median(repeats)
        row["first_over_warm"] = first.work_s / row["warm_work_s"]
        row["first_extra_s"] = first.work_s - row["warm_work_s"]  # what the callers queued behind it waited more
    if twin is not None and twin.work_s:
        row["alone_work_s"] = twin.work_s
    return row


def summarise(name: str, phase: Phase, result: dict, code: int, check_first: bool) -> dict:
    """Report lines and the verdict. `check_first`: hold the first request of a cold size to 1.5x its warm self
    (on the GPU; the CPU smoke's stages share two cores, so its timings say nothing)."""
    outcomes, alone = result["outcomes"], result["alone"]
    failed = [o for o in outcomes if o.error]
    failed_alone = [o for o in alone.values() if o.error]
    misses = [f"{len(failed)} + {len(failed_alone)} (alone) failed requests"] if failed or failed_alone else []
    for o in failed + failed_alone:
        say(f"FAILED {name} request {o.request.index} ({o.request.transport} {o.request.size}): {o.error}")
    sizes = {}
    for size, _ in phase.mix:
        latencies = [o.latency_s for o in outcomes if o.request.size == size and not o.error]
        if not latencies:
            continue
        row = {"warm": size in phase.warm, "n": len(latencies), "p50_s": statistics.median(latencies)}
        row["p99_s"] = percentile(latencies, 0.99)
        line = f"SIZE {name} {size} ({'warm' if row['warm'] else 'cold'}): n={row['n']} p50 {row['p50_s']:.2f} s"
        line += f" p99 {row['p99_s']:.2f} s"
        if not row["warm"]:
            row |= first_of_size(size, outcomes, alone)
            ratio = row.get("first_over_warm")
            nan = float("nan")
            line += f"; first of size {row['first_latency_s']:.2f} s end to end, work {row['first_work_s'] or nan:.2f}"
            line += f" s vs {row.get('warm_work_s', nan):.2f} s warm in the load = {ratio or nan:.2f}x (alone: "
            line += f"{row.get('alone_work_s', nan):.2f} s; first in queue: {row['first_in_queue']})"
            if check_first and (ratio is None or ratio > MAX_FIRST_RATIO or not row["first_in_queue"]):
                misses.append(f"first {size} request: {ratio or nan:.2f}x its warm self")
        sizes[size] = row
        say(line)
    succeeded = [o for o in outcomes if not o.error]
    values, equal = [], 0
    for o in succeeded:
        reference = alone.get(o.request.distinct)
        if reference is None or reference.error:
            continue
        equal += int(np.array_equal(o.image, reference.image))
        values.append(psnr(o.image, reference.image))
    min_psnr = min(values) if values else float("nan")
    if len(values) < len(succeeded) or not values or min_psnr < MIN_PSNR_DB:
        misses.append(f"images: {len(values)} of {len(succeeded)} compared, min PSNR {min_psnr:.1f} dB")
    changed = result["switches"] - {result["initial_switches"]}
    if changed:
        misses.append(f"SDPA switches changed during the load: {sorted(changed)}")
    if code != 0:
        misses.append(f"serve all exited {code}")
    wall = result["wall_s"]
    http = sum(o.request.transport == "http" for o in outcomes)
    say(f"IMAGES {name}: {len(values)} compared with the same request alone, {equal} bitwise equal, "
        f"min PSNR {min_psnr:.1f} dB")  # fmt: skip
    say(f"LOAD {name}: {len(outcomes)} requests ({http} HTTP) from {result['callers']} callers, {len(succeeded)} "
        f"succeeded, {len(failed)} failed, {len(succeeded) / wall:.3f} requests/s, wall {wall:.1f} s, SERVING "
        f"after {result['ready_s']:.1f} s, SDPA switches changed: {bool(changed)}")  # fmt: skip
    verdict = "; ".join(misses) or "pass"
    say(f"VERDICT {name}: {'PASS' if not misses else 'FAIL: ' + verdict}")
    report = {
        "phase": name, "kernels": phase.kernels, "family": phase.family, "steps": phase.steps,
        "callers": result["callers"], "requests": len(outcomes), "http_requests": http, "failed": len(failed),
        "failed_alone": len(failed_alone), "errors": [o.error for o in failed + failed_alone],
        "requests_per_s": len(succeeded) / wall, "wall_s": wall, "ready_s": result["ready_s"], "sizes": sizes,
        "images_compared": len(values), "images_equal": equal, "min_psnr_db": min_psnr,
        "alone_latency_s": {d: o.latency_s for d, o in alone.items()}, "switches_changed": sorted(changed),
        "serve_exit": code, "verdict": verdict,
        "attention": kernels.attention_choices() if torch.cuda.is_available() else {},
    }  # fmt: skip
    emit(**report)
    return report


def run_phase(name: str, phase: Phase, modules: dict | None, args) -> dict:
    device = "cpu" if args.smoke else "cuda"
    compile = "off" if args.smoke else args.compile
    emit(starting=name, at=time.strftime("%H:%M:%S"))
    server = ServeAll(phase, name, modules, device, compile)
    code, result = server.run(lambda s: drive(s, phase, args.callers, args.smoke))
    report = summarise(name, phase, result, code, check_first=not args.smoke)
    del server, result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=None, help=f"comma-separated: {', '.join(PHASES)}")
    parser.add_argument("--callers", type=int, default=None, help="concurrent callers (default 8; smoke 2)")
    parser.add_argument("--compile", default="on", choices=["on", "off", "auto"])
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU (CI)")
    args = parser.parse_args()
    args.callers = args.callers or (2 if args.smoke else 8)
    names = (args.phases or (SMOKE_PHASES if args.smoke else DEFAULT_PHASES)).split(",")
    unknown = set(names) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a GPU (or --smoke)")
    import openai  # noqa: F401 - fail now, not after building the models

    failed = check_kernels("cpu" if args.smoke else "cuda")
    for failure in failed:
        say(f"FAILED kernel check: {failure}")
    say(f"VERDICT kernels-equal-sdpa: {'PASS' if not failed else 'FAIL'}")
    modules = Modules()
    reports = []
    for name in names:
        phase = PHASES[name].smoke() if args.smoke else PHASES[name]
        try:
            reports.append(run_phase(name, phase, None if args.smoke else modules.for_phase(phase), args))
        except Exception as exc:  # noqa: BLE001 - report it and go on to the next phase
            say(f"VERDICT {name}: FAIL: {type(exc).__name__}: {exc}"[:2000])
            reports.append({"phase": name, "verdict": f"{type(exc).__name__}: {exc}"})
    bad = [r["phase"] for r in reports if r["verdict"] != "pass"] + (["kernels-equal-sdpa"] if failed else [])
    say(f"{'FAILED: ' + ', '.join(bad) if bad else 'ALL PASSED'}")
    return len(bad)


if __name__ == "__main__":
    sys.exit(main())
