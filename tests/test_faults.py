"""Nothing is lost through stage restarts.

One replica per stage (gateway, encoder, denoiser, VAE) and a private redis-server, with concurrent SDK clients
asking all the time while, one after the other: Redis is killed (-9) and restarted, the VAE and the encoder are
killed (-9) and restarted, the denoiser and the gateway get SIGTERM (they drain) and are restarted. Every request
must succeed, every image must equal its reference bit for bit, and every fault must have hit requests in
flight.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from imagegen_client.sdk import ImageClient

from imagegen.common.tiny import tiny_checkpoint_cached
from tests.service_harness import RedisServer, Service, stop_all

MODEL = "qwen-image"
CLIENTS = 4
OPTIONS = dict(steps=2, width=32, height=32, negative_prompt="blurry", guidance_scale=4.0, output_format="npy")
KEYS = [(f"a lighthouse on a cliff, take {i}", 100 + i) for i in range(6)]  # (prompt, seed)
CALL_TIMEOUT = 120.0
MIN_SPANNING = 1  # requests in flight across each fault


@dataclass
class Traffic:
    """What the clients did: (key index, start, end, image or error) per request."""

    done: list[tuple[int, float, float, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def record(self, entry: tuple[int, float, float, object]) -> None:
        with self.lock:
            self.done.append(entry)
        with self.progress:
            self.progress.notify_all()

    def wait_for_more(self, count: int, timeout: float = 120) -> None:
        """Block until `count` more requests have finished (so the next fault meets a busy system)."""
        with self.lock:
            target = len(self.done) + count
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.done) >= target, timeout), "the clients made no progress"


def _client_loop(address: str, worker: int, traffic: Traffic) -> None:
    with ImageClient(address, timeout=CALL_TIMEOUT) as client:
        index = worker
        while not traffic.stop.is_set():
            key = index % len(KEYS)
            prompt, seed = KEYS[key]
            start = time.monotonic()
            try:
                outcome: object = client.generate(prompt, seed=seed, **OPTIONS).array
            except Exception as exc:  # recorded, asserted on below
                outcome = exc
            traffic.record((key, start, time.monotonic(), outcome))
            index += CLIENTS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fault-logs")
    redis = RedisServer(logs)
    model = ["--model", str(tiny_checkpoint_cached(MODEL)), "--model-id", MODEL]
    cache = ["--redis-url", redis.url]
    stages = {
        "encoder": Service("encoder", "encoder", model + cache, logs),
        "denoiser": Service("denoiser", "denoiser", model + cache, logs),
        "vae": Service("vae", "vae", model, logs),
    }
    processes = {"redis": redis, **stages}
    try:
        for service in stages.values():
            service.wait_serving()
        backends = [f"--{name}={service.address}" for name, service in stages.items()]
        processes["gateway"] = Service("gateway", "gateway", backends, logs)
        processes["gateway"].wait_serving()
        yield processes
    finally:
        stop_all(list(processes.values()))


def _restart(service: Service) -> None:
    service.restart()
    service.wait_serving()


def test_every_request_survives_every_stage_restarting(stack):
    gateway = stack["gateway"]
    with ImageClient(gateway.address, timeout=CALL_TIMEOUT) as client:
        references = {
            key: client.generate(prompt, seed=seed, **OPTIONS).array for key, (prompt, seed) in enumerate(KEYS)
        }

    traffic = Traffic()
    clients = [threading.Thread(target=_client_loop, args=(gateway.address, w, traffic)) for w in range(CLIENTS)]
    for thread in clients:
        thread.start()
    faults: list[tuple[str, float]] = []
    try:
        traffic.wait_for_more(CLIENTS)
        # Redis killed: tensors travel inline, a key lost with it is re-encoded.
        faults.append(("redis -9", time.monotonic()))
        stack["redis"].kill()
        stack["redis"].stop()
        stack["redis"] = RedisServer(stack["redis"].log_path.parent, stack["redis"].port)
        for name in ("vae", "encoder"):  # killed: their in-flight calls fail and are retried once they are back
            traffic.wait_for_more(CLIENTS)
            faults.append((f"{name} -9", time.monotonic()))
            stack[name].kill()
            _restart(stack[name])
        for name in ("denoiser", "gateway"):  # SIGTERM: they finish what they have, then exit cleanly
            traffic.wait_for_more(CLIENTS)
            faults.append((f"{name} SIGTERM", time.monotonic()))
            stack[name].terminate()
            assert stack[name].proc.wait(60) == 0, stack[name].log()[-2000:]
            _restart(stack[name])
        traffic.wait_for_more(2 * CLIENTS)
    finally:
        traffic.stop.set()
        for thread in clients:
            thread.join(CALL_TIMEOUT + 10)

    failures = [(KEYS[key][0], repr(outcome)) for key, _, _, outcome in traffic.done if isinstance(outcome, Exception)]
    assert not failures, failures
    wrong = [KEYS[key][0] for key, _, _, image in traffic.done if not np.array_equal(image, references[key])]
    assert not wrong, wrong
    for fault, at in faults:
        spanning = sum(1 for _, start, end, _ in traffic.done if start < at < end)
        assert spanning >= MIN_SPANNING, f"no request was in flight when {fault} happened"
    assert len(traffic.done) >= 6 * CLIENTS
