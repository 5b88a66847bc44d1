"""The serving core without model processes: wire format, cache keys and stores, the job queue, retries,
statuses, auth and flags."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from imagegen_client.outputs import decode_output, encode_array, to_uint8
from imagegen_client.transport import client_options
from prometheus_client import REGISTRY

from imagegen.common.cache import EmbeddingKey, LruBytes, RedisStore
from imagegen.common.denoise import StepHooks
from imagegen.common.errors import Cancelled, InvalidArgument
from imagegen.common.serving import metrics
from imagegen.common.serving.auth import ApiKeys
from imagegen.common.serving.channels import call_with_retries
from imagegen.common.serving.config import ConfigError, add_common_flags, bind_host
from imagegen.common.serving.embeddings import EmbeddingCache, load_embeddings
from imagegen.common.serving.handlers import QueueFull, rpc
from imagegen.common.serving.jobs import JobQueue
from imagegen.common.serving.retry import HANDOFF_MARGIN_S, Deadline, RetryPolicy
from imagegen.common.serving.routes import RouteTable, parse_routes
from imagegen.common.serving.status import (
    EMBEDDINGS_MISSING,
    QUEUE_FULL,
    RETRIES_EXHAUSTED,
    ErrorDetails,
    RpcFailure,
    invalid_argument,
    parse_error,
    with_reason,
)
from imagegen.common.serving.tls import TlsConfig
from imagegen.common.wire import pack, unpack
from imagegen.v1 import common_pb2, denoiser_pb2_grpc, encoder_pb2, encoder_pb2_grpc, vae_pb2_grpc
from tests.service_harness import RedisServer, free_port


# ------------------------------------------------------------------------------------------------ wire, outputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wire_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    back = unpack(pack(tensor, "embeds"), "embeds", "prompt_embeds")
    assert back.dtype == dtype and torch.equal(back, tensor)


@pytest.mark.parametrize(("blob", "name"), [(b"", "x"), (b"\x00" * 20, "x"), (pack(torch.ones(2), "other"), "x")])
def test_wire_rejects_foreign_blobs_naming_the_field(blob, name):
    with pytest.raises(InvalidArgument) as caught:
        unpack(blob, name, "condition.safetensors")
    assert caught.value.field == "condition.safetensors"


def test_npy_output_is_exact_and_png_rounds_like_diffusers():
    array = np.random.default_rng(0).random((2, 8, 16, 3), dtype=np.float32)
    npy = [decode_output(blob, "NPY") for blob in encode_array(array, "NPY")]
    assert np.array_equal(np.stack(npy), array) and npy[0].dtype == np.float32
    png = np.stack([decode_output(blob, "PNG") for blob in encode_array(array, "PNG")])
    assert np.array_equal((png * 255).round().astype(np.uint8), to_uint8(array))


# --------------------------------------------------------------------------------------------------- cache
def test_embedding_key_names_every_input():
    base = dict(
        model_id="m",
        revision="r",
        template_version="t",
        dtype="float32",
        device_type="cpu",
        prompt="p",
        max_sequence_length=512,
        image_digests=("a",),
    )
    key = str(EmbeddingKey(**base))
    assert key == str(EmbeddingKey(**base)) and key.startswith("imagegen:emb:v1:")
    changed = {"max_sequence_length": 511, "image_digests": ("b",), "prompt": "q"}
    for name in base:
        other = {**base, name: changed.get(name, base[name] + "x" if isinstance(base[name], str) else base[name])}
        assert str(EmbeddingKey(**other)) != key, name


def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    lru = LruBytes(max_bytes=30)
    lru.put("a", b"1" * 9)  # 10 bytes with the key
    lru.put("b", b"2" * 9)
    assert lru.get("a") is not None  # now "b" is the least recent
    lru.put("c", b"3" * 9)
    lru.put("d", b"4" * 9)
    assert (lru.get("b"), lru.size) == (None, 30)
    assert lru.get("a") and lru.get("c") and lru.get("d")
    lru.put("big", b"x" * 100)  # larger than the bound: not stored, nothing evicted
    assert lru.get("big") is None and len(lru) == 3


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def _counting_compute(calls: list, value: bytes = b"tensor-bytes"):
    async def compute(abandoned) -> bytes:
        assert not abandoned()  # a waiting caller wants it
        calls.append(1)
        await asyncio.sleep(0.05)
        return value

    return compute


def test_redis_cache_hit_skips_compute_and_dead_redis_falls_back_inline(redis):
    async def scenario():
        store = RedisStore(redis.url, ttl=60, timeout=0.2, cooldown=0.5)
        cache = EmbeddingCache(store, LruBytes(1 << 20))
        calls: list = []
        first, hit = await cache.get_or_compute("k1", False, _counting_compute(calls))
        assert (first.key, first.safetensors, hit) == ("k1", b"", False)
        concurrent = await asyncio.gather(
            *(cache.get_or_compute("k1", False, _counting_compute(calls)) for _ in range(3))
        )
        assert all(hit for _, hit in concurrent) and len(calls) == 1
        inline, hit = await cache.get_or_compute("k1", True, _counting_compute(calls))
        assert (inline.safetensors, hit, len(calls)) == (b"tensor-bytes", True, 1)

        redis.kill()
        fallbacks = metrics.CACHE_INLINE_FALLBACKS.labels("encoder")._value.get()
        start = time.monotonic()
        lost, hit = await cache.get_or_compute("k1", False, _counting_compute(calls))
        assert (lost.safetensors, hit, len(calls)) == (b"tensor-bytes", False, 2)
        assert metrics.CACHE_INLINE_FALLBACKS.labels("encoder")._value.get() == fallbacks + 1
        # Cooling down: the next lookups skip Redis instead of waiting for another timeout.
        await cache.get_or_compute("k2", False, _counting_compute(calls))
        assert time.monotonic() - start < 1.0
        await store.close()

    asyncio.run(scenario())


def test_single_flight_shares_one_encode_and_lru_mode_is_inline():
    async def scenario():
        cache = EmbeddingCache(None, LruBytes(1 << 20))
        calls: list = []
        results = await asyncio.gather(*(cache.get_or_compute("k", False, _counting_compute(calls)) for _ in range(4)))
        assert len(calls) == 1 and all(e.safetensors == b"tensor-bytes" and not e.key for e, _ in results)
        again, hit = await cache.get_or_compute("k", False, _counting_compute(calls))
        assert hit and again.safetensors == b"tensor-bytes" and len(calls) == 1

    asyncio.run(scenario())


def test_denoiser_side_reports_missing_embeddings(redis):
    async def scenario():
        store = RedisStore(redis.url, ttl=60, timeout=0.2)
        tensor = torch.arange(6.0).view(2, 3)
        await store.put("present", pack(tensor, "embeds"))
        fetched = await load_embeddings(encoder_pb2.Embeddings(key="present"), store, "prompt_embeds")
        assert torch.equal(fetched, tensor)
        for message, cache in ((encoder_pb2.Embeddings(key="absent"), store), (encoder_pb2.Embeddings(key="x"), None)):
            with pytest.raises(RpcFailure) as caught:
                await load_embeddings(message, cache, "prompt_embeds")
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert caught.value.details[0].reason == EMBEDDINGS_MISSING
        await store.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ job queue
def _call_each(works: list, hooks: list[StepHooks]) -> list:
    """The queue's `run` for payloads that are functions of their hooks (jobs run one at a time here)."""
    return [work(h) for work, h in zip(works, hooks, strict=True)]


def _steps(count: int, step_seconds: float, ran: list):
    def work(hooks: StepHooks) -> str:
        for step in range(count):
            if hooks.should_stop():
                raise Cancelled(f"before step {step + 1}")
            time.sleep(step_seconds)
            ran.append(step)
            hooks.on_step(step + 1, count)
        return "done"

    return work


async def _collect(ticket, until: str | None = None) -> list:
    events = []
    async for event in ticket.events():
        events.append(event)
        if event.kind == until:
            break
    return events


def _jobs_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("imagegen_denoise_jobs_total", {"outcome": outcome}) or 0.0


def test_job_queue_positions_capacity_cancel_and_deadline():
    async def scenario():
        queue = JobQueue(capacity=1, run=_call_each, name="test-jobs")
        long_ran: list = []
        running = queue.submit(_steps(1000, 0.01, long_ran))
        await _collect(running, until="step")
        waiting = queue.submit(_steps(2, 0.0, []))
        assert (await _collect(waiting, until="queued"))[-1].position == 1
        with pytest.raises(QueueFull):
            queue.submit(_steps(1, 0.0, []))
        cancelled = _jobs_total("cancelled")
        queue.withdraw(waiting)
        assert isinstance((await _collect(waiting))[-1].error, Cancelled)
        assert _jobs_total("cancelled") == cancelled + 1  # one that never ran has its outcome too
        queue.withdraw(running)
        seen = len(long_ran)
        last = (await _collect(running))[-1]
        assert isinstance(last.error, Cancelled) and len(long_ran) <= seen + 1
        assert _jobs_total("cancelled") == cancelled + 2

        # A deadline stops a job the same way, and a failing job does not stop the worker.
        deadline_ran: list = []
        expired = _jobs_total("deadline")
        timed = queue.submit(_steps(1000, 0.01, deadline_ran), timeout=0.1)
        assert isinstance((await _collect(timed))[-1].error, Cancelled) and len(deadline_ran) < 30
        assert _jobs_total("deadline") == expired + 1

        def broken(hooks: StepHooks) -> None:
            raise ValueError("boom")

        assert isinstance((await _collect(queue.submit(broken)))[-1].error, ValueError)
        done = await _collect(queue.submit(_steps(2, 0.0, [])))
        assert [e.kind for e in done] == ["started", "step", "step", "done"] and done[-1].result == "done"
        queue.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------- rpc plumbing
class _Failing(encoder_pb2_grpc.EncoderServiceServicer):
    """Raises what the prompt names, through the same wrapper every service uses."""

    def __init__(self) -> None:
        self.starting = 2  # answers to prompt "starting" that are UNAVAILABLE, as a stage still loading

    @rpc("test.Failing")
    async def Encode(self, request, context):
        if request.prompt == "starting" and self.starting:
            self.starting -= 1
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "encoder is still starting")
        errors = {
            "invalid": InvalidArgument("max_sequence_length", "too long"),
            "full": QueueFull("queue is full"),
            "cancelled": Cancelled("stopped"),
            "bug": ValueError("secret internals"),
        }
        if request.prompt in errors:
            raise errors[request.prompt]
        return encoder_pb2.EncodeResponse(cache_hit=True)


async def _serve(servicer, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_handler_maps_exceptions_to_statuses_and_keeps_serving():
    async def scenario():
        port = free_port()
        server = await _serve(_Failing(), port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            outcomes = {}
            for prompt in ("invalid", "full", "cancelled", "bug"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Encode(encoder_pb2.EncodeRequest(prompt=prompt, request_id=f"id-{prompt}"))
                outcomes[prompt] = parse_error(caught.value)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Encode(encoder_pb2.EncodeRequest(prompt="ok", request_id="has spaces"))
            bad_id = parse_error(caught.value)
            assert (await stub.Encode(encoder_pb2.EncodeRequest(prompt="ok"))).cache_hit
        await server.stop(0)
        return outcomes, bad_id

    outcomes, bad_id = asyncio.run(scenario())
    invalid = outcomes["invalid"]
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.field_violations == [("max_sequence_length", "too long")]
    assert (outcomes["full"].code, outcomes["full"].reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL)
    assert outcomes["full"].retry_delay == 1.0
    assert outcomes["cancelled"].code == grpc.StatusCode.CANCELLED
    assert outcomes["bug"].code == grpc.StatusCode.INTERNAL
    assert "secret" not in outcomes["bug"].message and "id-bug" in outcomes["bug"].message
    assert bad_id.field_violations[0][0] == "request_id"


def test_internal_calls_wait_for_a_late_backend_and_retry_while_it_starts():
    async def scenario():
        port = free_port()
        before = metrics.BACKEND_RETRIES.labels("late")._value.get()
        started: list = []

        async def start_late():
            await asyncio.sleep(0.3)
            started.append(await _serve(_Failing(), port))

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_options()) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            starter = asyncio.create_task(start_late())
            policy = RetryPolicy(attempts=20, initial_backoff=0.05, max_backoff=0.1)
            # Nothing listens yet: the call waits for the backend instead of failing.
            request = encoder_pb2.EncodeRequest(prompt="starting")
            reply = await call_with_retries(stub.Encode, request, "late", policy.budget(Deadline(10)))
            assert reply.cache_hit and started
            retries = metrics.BACKEND_RETRIES.labels("late")._value.get() - before
            # Other errors are final at once.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_with_retries(
                    stub.Encode, encoder_pb2.EncodeRequest(prompt="invalid"), "late", policy.budget(Deadline(10))
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert metrics.BACKEND_RETRIES.labels("late")._value.get() - before == retries
            await starter
        await started[0].stop(0)
        return retries

    # The two "still starting" answers were retried, drawing on one budget.
    assert asyncio.run(scenario()) == 2


def test_one_retry_budget_per_request_and_no_retry_of_what_was_retried():
    budget = RetryPolicy(attempts=3, initial_backoff=0.0, max_backoff=0.0).budget(Deadline(10))
    unavailable = ErrorDetails(grpc.StatusCode.UNAVAILABLE, "down")
    # Every call of the request draws on the same attempts: two retries, then final.
    assert [budget.delay(unavailable) for _ in range(3)] == [0.0, 0.0, None]
    fresh = RetryPolicy().budget(Deadline(10))
    assert fresh.delay(ErrorDetails(grpc.StatusCode.INVALID_ARGUMENT, "bad")) is None
    assert fresh.delay(ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "oom")) is None
    assert fresh.delay(ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_delay=0.5)) >= 0.5
    # A full queue is retried only a few times per request (busy_retries), whatever the attempts left.
    full = ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_delay=0.0)
    busy = RetryPolicy(busy_retries=2).budget(Deadline(10))
    assert [busy.delay(full) is not None for _ in range(3)] == [True, True, False]
    # The gateway marks what it gave up on, and the SDK's policy does not retry that again: a full queue keeps
    # its reason but loses its retry hint, an unavailable stage says RETRIES_EXHAUSTED.
    failure = fresh.failure(_rpc_error(with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL, "full", 1.0)))
    info = parse_error(_rpc_error(failure))
    assert (info.code, info.reason, info.retry_delay) == (grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL, None)
    assert RetryPolicy().budget(Deadline(10)).delay(info) is None
    gone = parse_error(_rpc_error(fresh.failure(_rpc_error(RpcFailure(grpc.StatusCode.UNAVAILABLE, "down")))))
    assert (gone.code, gone.reason) == (grpc.StatusCode.UNAVAILABLE, RETRIES_EXHAUSTED)
    assert RetryPolicy().budget(Deadline(10)).delay(gone) is None
    # CANCELLED as an answer means the other side dropped the call (a connection torn down): retried too.
    assert RetryPolicy().budget(Deadline(10)).delay(ErrorDetails(grpc.StatusCode.CANCELLED, "CANCELLED")) is not None
    dropped = parse_error(_rpc_error(fresh.failure(_rpc_error(RpcFailure(grpc.StatusCode.CANCELLED, "gone")))))
    assert dropped.reason == RETRIES_EXHAUSTED and RetryPolicy().budget(Deadline(10)).delay(dropped) is None
    # A retry that would end after the deadline is not made.
    assert RetryPolicy().budget(Deadline(0.0)).delay(unavailable) is None
    # Final errors that were never retryable are relayed as they are.
    relayed = parse_error(_rpc_error(fresh.failure(_rpc_error(invalid_argument("width", "odd")))))
    assert (relayed.code, relayed.reason, relayed.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
        [("width", "odd")],
    )


class _StatusError(grpc.RpcError):
    def __init__(self, failure: RpcFailure) -> None:
        self._status = failure.to_status()

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def _rpc_error(failure: RpcFailure) -> grpc.RpcError:
    return _StatusError(failure)


# ------------------------------------------------------------------------------------------- auth and config
def test_api_keys_check_bearer_and_follow_file_changes(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\nalpha-key-0001\n\nbeta-key-00002\n")
    keys = ApiKeys(path)
    keys.check([("authorization", "Bearer beta-key-00002")])
    for metadata in ([], [("authorization", "Bearer gamma-key-0003")], [("authorization", "Basic alpha-key-0001")]):
        with pytest.raises(RpcFailure) as caught:
            keys.check(metadata)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    path.write_text("gamma-key-0003\n")
    keys.check([("authorization", "Bearer gamma-key-0003")])
    with pytest.raises(RpcFailure):
        keys.check([("authorization", "Bearer alpha-key-0001")])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError):
        ApiKeys(tmp_path / "empty")


def test_flags_read_the_environment_and_flags_win(monkeypatch):
    monkeypatch.setenv("IMAGEGEN_PORT", "6000")
    monkeypatch.setenv("IMAGEGEN_DRAIN_TIMEOUT", "5")
    parser = argparse.ArgumentParser()
    add_common_flags(parser, port=50052, metrics_port=9101)
    from_env = parser.parse_args([])
    assert (from_env.port, from_env.drain_timeout, from_env.metrics_port, from_env.host) == (6000, 5.0, 9101, None)
    # Unset --host: loopback (the CLI asks for it so, for every service: issue 20).
    assert bind_host(None, public=False) == "127.0.0.1"
    assert bind_host("10.1.2.3", public=False) == "10.1.2.3"
    assert parser.parse_args(["--port", "7000"]).port == 7000
    monkeypatch.setenv("IMAGEGEN_PORT", "not-a-port")
    parser = argparse.ArgumentParser()
    add_common_flags(parser, port=50052, metrics_port=9101)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_bad_tls_and_routes_configuration_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        TlsConfig.from_args(str(tmp_path / "cert.pem"), None, None)
    with pytest.raises(ConfigError, match="cannot read"):
        TlsConfig.from_args(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), None)
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        TlsConfig(ca=b"pem").server_credentials(internal=True)
    for text in ("not json", "[]", '{"m": {"encoder": "a"}}', '{"m": {"encoder": "", "denoiser": "b", "vae": "c"}}'):
        with pytest.raises(ConfigError):
            parse_routes(text)
    assert parse_routes('{"m": {"encoder": "a:1", "denoiser": "b:2", "vae": "c:3"}}')["m"]["vae"] == "c:3"


def test_deadline_raises_deadline_exceeded_once_past():
    assert Deadline(None).remaining() is None
    assert 10 - HANDOFF_MARGIN_S - 0.01 < Deadline(10).remaining() <= 10 - HANDOFF_MARGIN_S  # the stage's ends first
    deadline = Deadline(0.05)
    assert 0 < deadline.remaining() <= 0.025
    threading.Event().wait(0.06)
    with pytest.raises(RpcFailure) as caught:
        deadline.remaining()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_denoiser_group_with_a_ulysses_degree_that_does_not_divide_the_heads_fails_at_start_up():
    from imagegen.cli import build_parser
    from imagegen.common.parallel.layout import LayoutError
    from imagegen.common.serving.hosting import HostedModel
    from imagegen.common.tiny import tiny_checkpoint_cached
    from imagegen.services.denoiser_config import DenoiserConfig
    from imagegen.services.denoiser_engine import make_engine

    model = str(tiny_checkpoint_cached("z-image"))
    argv = ["serve", "denoiser", "--model", model, "--sp", "6", "--ulysses", "3", "--collective-timeout", "30"]
    args = build_parser().parse_args([*argv, "--torch-threads", "1"])
    hosted = HostedModel.from_args(args)
    with pytest.raises(
        LayoutError,
        match="--ulysses 3 does not fit --sp 6 on a model with 4 attention heads .*: --ulysses 2, --ulysses 1",
    ):
        make_engine(DenoiserConfig.from_flags(args, hosted), hosted)


class _Describer(
    encoder_pb2_grpc.EncoderServiceServicer,
    denoiser_pb2_grpc.DenoiserServiceServicer,
    vae_pb2_grpc.VaeServiceServicer,
):
    async def Describe(self, request, context):
        return common_pb2.ModelInfo(model_id="up", family="qwen-image")


def test_gateway_is_ready_with_its_default_route_while_another_model_is_down():
    async def scenario():
        port = free_port()
        server = grpc.aio.server()
        servicer = _Describer()
        for add in (
            encoder_pb2_grpc.add_EncoderServiceServicer_to_server,
            denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server,
            vae_pb2_grpc.add_VaeServiceServicer_to_server,
        ):
            add(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        up = dict.fromkeys(("encoder", "denoiser", "vae"), f"127.0.0.1:{port}")
        down = {stage: f"127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")}
        table = RouteTable({"up": up, "down": down}, "up", TlsConfig(), RetryPolicy())
        try:
            await asyncio.wait_for(table.discover(), 10)  # returns although "down" never answers
            route, family = await table.get("", RetryPolicy().budget(Deadline(5)))
            start = time.monotonic()
            with pytest.raises(RpcFailure) as caught:
                await table.get("down", RetryPolicy().budget(Deadline(1)))
            waited = time.monotonic() - start
        finally:
            await table.close()
            await server.stop(0)
        return route.name, family.name, caught.value, waited

    name, family, failure, waited = asyncio.run(scenario())
    assert (name, family) == ("up", "qwen-image")
    # A request for the model that is down waits for it within its deadline, then says so without its address.
    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.9 < waited < 3
    assert "127.0.0.1" not in failure.message
