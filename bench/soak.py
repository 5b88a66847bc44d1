"""Soak: concurrent SDK clients on loopback for minutes, with faults injected, and nothing may be lost.

    python bench/soak.py [--minutes 10] [--clients 16] [--json soak.json]

One replica per stage (gateway, encoder, denoiser, VAE, as separate processes) and a private redis-server, on a
tiny Qwen-Image checkpoint (2 steps at 32x32 with CFG, NPY output, torch threads pinned to 1 everywhere).
Every client loops over a few (prompt, seed) pairs whose images were computed before the run, and every answer
is compared with its reference bit for bit: a failure or a wrong image is "lost".

Faults, one after the other and each restarted at once on its port: Redis -9, VAE -9, encoder -9, denoiser
SIGTERM, gateway SIGTERM; then again, until a quarter of the run has passed. The rest of the run has no faults,
so each process's memory is compared over at least three quarters of it: RSS when the faults end (every
process has then served requests since its last start) and at the end. Prints a markdown summary (requests,
lost, p50/p99 latency, RSS per process) and optionally writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from imagegen_client.sdk import ImageClient

from imagegen.common.tiny import tiny_checkpoint_cached
from tests.service_harness import RedisServer, Service, stop_all  # the test harness starts the stack

MODEL = "qwen-image"
OPTIONS = dict(steps=2, width=32, height=32, negative_prompt="blurry", guidance_scale=4.0, output_format="npy")
KEYS = [(f"a soak test prompt, number {i}", 1000 + i) for i in range(8)]
FAULTS = ("redis -9", "vae -9", "encoder -9", "denoiser SIGTERM", "gateway SIGTERM")


@dataclass
class Record:
    latencies: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def client_loop(address: str, worker: int, clients: int, stop: threading.Event, refs: dict, record: Record) -> None:
    with ImageClient(address, timeout=120) as client:
        index = worker
        while not stop.is_set():
            prompt, seed = KEYS[index % len(KEYS)]
            index += clients
            start = time.monotonic()
            try:
                ok = np.array_equal(client.generate(prompt, seed=seed, **OPTIONS).array, refs[prompt])
                problem = None if ok else f"wrong image for {prompt!r}"
            except Exception as exc:  # counted as lost, reported below
                problem = f"{type(exc).__name__}: {exc}"[:300]
            with record.lock:
                record.latencies.append(time.monotonic() - start)
                if problem:
                    record.lost.append(problem)


def start_stack(logs: Path, log_level: str) -> dict:
    redis = RedisServer(logs)
    model = ["--model", str(tiny_checkpoint_cached(MODEL)), "--model-id", MODEL, "--log-level", log_level]
    cache = ["--redis-url", redis.url]
    stages = {
        "encoder": Service("encoder", "encoder", model + cache, logs),
        "denoiser": Service("denoiser", "denoiser", model + cache, logs),
        "vae": Service("vae", "vae", model, logs),
    }
    for service in stages.values():
        service.wait_serving()
    backends = [f"--{name}={service.address}" for name, service in stages.items()]
    gateway = Service("gateway", "gateway", [*backends, "--log-level", log_level], logs)
    gateway.wait_serving()
    return {"redis": redis, **stages, "gateway": gateway}


def inject(fault: str, stack: dict) -> None:
    name, how = fault.split()
    if name == "redis":
        stack["redis"].kill()
        stack["redis"].stop()
        stack["redis"] = RedisServer(stack["redis"].log_path.parent, stack["redis"].port)
        return
    service = stack[name]
    if how == "-9":
        service.kill()
    else:
        service.terminate()
        code = service.proc.wait(60)
        if code != 0:
            raise RuntimeError(f"{name} exited with {code} after SIGTERM")
    service.restart()
    service.wait_serving()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--log-level", default="warning", help="of the services (their logs stay in a temp folder)")
    args = parser.parse_args(argv)
    duration = args.minutes * 60
    logs = Path(tempfile.mkdtemp(prefix="imagegen-soak-"))
    stack = start_stack(logs, args.log_level)
    print(f"logs in {logs}", file=sys.stderr)
    try:
        with ImageClient(stack["gateway"].address, timeout=120) as client:
            refs = {prompt: client.generate(prompt, seed=seed, **OPTIONS).array for prompt, seed in KEYS}
        record, stop = Record(), threading.Event()
        threads = [
            threading.Thread(
                target=client_loop, args=(stack["gateway"].address, w, args.clients, stop, refs, record), daemon=True
            )
            for w in range(args.clients)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        injected: list[tuple[float, str]] = []
        while time.monotonic() - started < duration / 4 or len(injected) < len(FAULTS):
            fault = FAULTS[len(injected) % len(FAULTS)]
            inject(fault, stack)
            injected.append((round(time.monotonic() - started, 1), fault))
        stop.wait(10)  # let every restarted process serve a while before its memory counts as "start"
        services = ("encoder", "denoiser", "vae", "gateway")
        rss_start = {name: rss_bytes(stack[name].proc.pid) for name in services}
        measured_from = time.monotonic() - started
        stop.wait(max(0.0, duration - (time.monotonic() - started)))
        rss_end = {name: rss_bytes(stack[name].proc.pid) for name in services}
        stop.set()
        for thread in threads:
            thread.join(130)
        elapsed = time.monotonic() - started
    finally:
        stop_all(list(stack.values()))

    latencies = sorted(record.latencies)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()}: {os.cpu_count()} vCPU, {platform.processor() or platform.machine()}",
        "command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "lost": len(record.lost),
        "lost_examples": record.lost[:5],
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "faults": injected,
        "rss_measured_from_s": round(measured_from, 1),
        "rss_mib": {
            name: {
                "start": round(rss_start[name] / 2**20, 1),
                "end": round(rss_end[name] / 2**20, 1),
                "growth_pct": round(100 * (rss_end[name] / rss_start[name] - 1), 1),
            }
            for name in rss_start
        },
    }
    print(f"{summary['requests']} requests in {summary['seconds']} s by {args.clients} clients, {summary['lost']} lost")
    print(f"latency p50 {summary['p50_s']} s, p99 {summary['p99_s']} s; {len(injected)} faults: {injected}")
    print(f"\n| process | RSS at {summary['rss_measured_from_s']} s (MiB) | RSS at end (MiB) | growth |")
    print("|---|---|---|---|")
    for name, mem in summary["rss_mib"].items():
        print(f"| {name} | {mem['start']} | {mem['end']} | {mem['growth_pct']:+.1f}% |")
    for problem in record.lost[:5]:
        print("lost:", problem)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not record.lost else 1


if __name__ == "__main__":
    sys.exit(main())
