"""Loopback benchmark: the same requests in process and through gateway + encoder + denoiser + VAE processes.

    python bench/loopback.py [--family qwen-image] [--requests 48] [--concurrency 1 4 16]

Every request has its own prompt (so each one runs the text encoder: no cache hits flatter the services) and
asks for the NPY float32 output. In process, concurrent callers queue (FIFO) for one `Pipeline`, as jobs queue
for the denoiser service. Prints a markdown table: throughput and p50/p99 latency per concurrency, and the
p50 the services add at concurrency 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Stack:
    """Redis (when installed) and the four services as separate processes on free loopback ports."""

    def __init__(self, model: Path, threads: int, logs: Path, redis: bool) -> None:
        env = {**os.environ, "IMAGEGEN_TORCH_THREADS": str(threads)}
        self.procs: list[subprocess.Popen] = []
        cache: list[str] = []
        if redis:
            port = _free_port()
            self._spawn(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], logs / "redis", env)
            cache = ["--redis-url", f"redis://127.0.0.1:{port}/0"]
        self.redis = bool(cache)
        addresses = {}
        for stage in ("encoder", "denoiser", "vae"):
            addresses[stage] = f"127.0.0.1:{_free_port()}"
            extra = cache if stage != "vae" else []
            self._serve(stage, addresses[stage], ["--model", str(model), *extra], env, logs)
        self.address = f"127.0.0.1:{_free_port()}"
        flags = [f"--{stage}={address}" for stage, address in addresses.items()]
        self._serve("gateway", self.address, flags, env, logs)
        for address in (*addresses.values(), self.address):
            self._wait_serving(address)

    def _spawn(self, argv: list[str], log: Path, env: dict) -> None:
        self.procs.append(subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env))  # noqa: SIM115

    def _serve(self, kind: str, address: str, args: list[str], env: dict, logs: Path) -> None:
        port = address.rsplit(":", 1)[1]
        argv = [sys.executable, "-m", "imagegen.cli", "serve", kind, "--host", "127.0.0.1", "--port", port]
        self._spawn(argv + ["--metrics-port", "0", "--log-level", "warning", *args], logs / f"{kind}.log", env)

    def _wait_serving(self, address: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{address} not serving")

    def close(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(30)


def _measure(call: Callable[[int], object], requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            start = time.perf_counter()
            call(index)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "throughput": requests / wall,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen-image", choices=["qwen-image", "z-image"])
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1, help="in process and in each service")
    parser.add_argument("--rounds", type=int, default=3, help="alternate in-process/services rounds; best p50 kept")
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=bool(shutil.which("redis-server")),
        help="embeddings through a private redis-server (default: when installed), else the encoder's LRU",
    )
    args = parser.parse_args()

    import torch
    from imagegen_client.sdk import ImageClient

    from imagegen.common.options import RequestOptions
    from imagegen.common.pipeline import Pipeline
    from imagegen.common.tiny import tiny_checkpoint_cached

    torch.set_num_threads(args.torch_threads)
    model = tiny_checkpoint_cached(args.family)
    size = {"width": args.width, "height": args.height, "steps": args.steps, "seed": 0}
    pipeline = Pipeline(model)
    worker = ThreadPoolExecutor(1)  # FIFO, one request at a time

    def in_process(index: int) -> object:
        options = RequestOptions(prompt=f"bench prompt {index} {time.monotonic_ns()}", **size)
        return worker.submit(pipeline, options).result()

    logs = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    stack = _Stack(model, args.torch_threads, logs, args.redis)
    client = ImageClient(stack.address, timeout=120)

    def services(index: int) -> object:
        prompt = f"bench prompt {index} {time.monotonic_ns()}"
        return client.generate(prompt, output_format="npy", **size).array

    try:
        for call in (in_process, services):  # warm up: first-call allocations, channel set-up
            _measure(call, 8, 1)
        results: dict[tuple[str, int], dict[str, float]] = {}
        for _ in range(args.rounds):
            for concurrency in args.concurrency:
                for name, call in (("in-process", in_process), ("services", services)):
                    measured = _measure(call, args.requests, concurrency)
                    best = results.get((name, concurrency))
                    if best is None or measured["p50"] < best["p50"]:
                        results[name, concurrency] = measured
    finally:
        client.close()
        stack.close()
        worker.shutdown()

    print(
        f"\n{args.family} {args.width}x{args.height}, {args.steps} steps, NPY output, torch threads "
        f"{args.torch_threads}, Redis {'on' if stack.redis else 'off'}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; best of {args.rounds} rounds of {args.requests} requests\n"
    )
    print("| concurrency | path | throughput (req/s) | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|")
    for concurrency in args.concurrency:
        for name in ("in-process", "services"):
            r = results[name, concurrency]
            print(f"| {concurrency} | {name} | {r['throughput']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} |")
    first = args.concurrency[0]
    overhead = results["services", first]["p50"] - results["in-process", first]["p50"]
    ratio = results["services", first]["p50"] / results["in-process", first]["p50"]
    print(f"\nservices add {overhead:.1f} ms p50 at concurrency {first} ({ratio:.2f}x in-process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
