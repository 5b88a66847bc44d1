"""The security review's findings (docs: ../shared/docs/security-review-2026-12-02.md, issue 20), each against a
real `serve all` (tiny edit model, API keys on, per-key quotas, a low fd limit) started without --host, plus the
mechanisms on their own (keys, quotas, fair turns, exposure rules, the loop's log limiter).

Memory is measured as the server's peak VmRSS above its level before the request, sampled every few ms."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import re
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import PIL.Image
import pytest
import requests
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from imagegen_client.status import parse_error

from imagegen.common.errors import InvalidArgument
from imagegen.common.images import check_decoded_bytes
from imagegen.common.options import ResolvedOptions
from imagegen.common.serving.auth import InternalToken
from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.echo import clip
from imagegen.common.serving.exposure import resolve_exposure
from imagegen.common.serving.keys import ApiKeys
from imagegen.common.serving.quota import FairSlots, QuotaConfig, Quotas, check_work, request_work
from imagegen.common.serving.server import RateLimitedExceptions
from imagegen.common.serving.status import RpcFailure
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.v1 import common_pb2, encoder_pb2_grpc, image_service_pb2, image_service_pb2_grpc
from tests.service_harness import INTERNAL_TOKEN, Service, stop_all, token_env

KEY_A, KEY_B, KEY_C = "tenant-a-key-0123456789", "tenant-b-key-0123456789", "tenant-c-key-0123456789"
MB = 1 << 20
FD_LIMIT = 400  # the server's: 1,000 half-open connections would exhaust it without the connection bound
MAX_CONNECTIONS = 200
HEADER_TIMEOUT = 2.0
SMALL = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2, "seed": 3}
# The fairness test's request: enough denoising that its latency is the server's work, not HTTP overhead.
FAIR = {"size": "256x256", "num_inference_steps": 8}
FAIR_WORK = 256 * 256 * 8 / MB  # megapixel-steps (no negative prompt: one branch); SMALL's are negligible
WORK_PER_MINUTE = 16 * FAIR_WORK
STAGES = ("encoder", "denoiser", "vae")


class UnboundService(Service):
    """`serve all` exactly as a user starts it, without --host, under a low fd limit."""

    def _argv(self, new_ports: bool = True) -> list[str]:
        argv = super()._argv(new_ports)
        at = argv.index("--host")
        del argv[at : at + 2]
        return ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", *argv]


def _png(width: int = 32, height: int = 32) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def _start(name: str, model: str, logs, keys, extra: list[str]) -> Service:
    args = ["--model", str(tiny_checkpoint_cached(model)), "--model-id", model, "--api-keys-file", str(keys)]
    args += [f"--{stage}=127.0.0.1:{port}" for stage, port in zip(STAGES, _ports(3), strict=True)]
    return UnboundService(name, "all", args + extra, logs, env=token_env(logs))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A text model with tight quotas (most tests), and an edit model for the image tests; both without --host."""
    logs = tmp_path_factory.mktemp("security-logs")
    keys = logs / "keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n{KEY_C}\n")
    quotas = ["--key-max-in-flight", "2", f"--key-work-per-minute={WORK_PER_MINUTE}", "--max-active-requests", "1"]
    bounds = [f"--http-max-connections={MAX_CONNECTIONS}", f"--http-header-timeout={HEADER_TIMEOUT}"]
    started = {
        "gen": _start("all-gen", "qwen-image", logs, keys, [*quotas, *bounds, "--max-request-work", "4"]),
        "edit": _start("all-edit", "qwen-image-edit-plus", logs, keys, ["--max-images", "4"]),
    }
    try:
        for service in started.values():
            service.wait_serving(timeout=180)
            service.keys_file = keys
        yield started
    finally:
        stop_all(list(started.values()))


@pytest.fixture(scope="module")
def server(servers):
    return servers["gen"]


@pytest.fixture(scope="module")
def edit_server(servers):
    return servers["edit"]


def _ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _url(server: Service, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _generate(server: Service, key: str | None, headers: dict | None = None, **fields) -> requests.Response:
    url = _url(server, "/v1/images/generations")
    return requests.post(url, headers={**_auth(key), **(headers or {})}, json={**SMALL, **fields}, timeout=120)


def _edit(server: Service, key: str | None, images: list[bytes] | None = None, **fields) -> requests.Response:
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images or [_png()])]
    data = {**SMALL, **fields}
    return requests.post(_url(server, "/v1/images/edits"), headers=_auth(key), files=files, data=data, timeout=120)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def peak_growth(pid: int):
    """Yields a list that holds, once the block has run, the peak RSS growth over the block in bytes."""
    base, peak, done = _rss(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid) - base)
            time.sleep(0.003)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result: list[int] = []
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result.append(peak[0])


def _raw_post(port: int, path: str, headers: dict[str, str], size: int) -> bytes:
    """POST a `size`-byte body of zeros (as far as the server lets us send it); the answer's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        chunk = b"0" * MB
        with contextlib.suppress(OSError):  # the server may close before the body is all sent
            for _ in range(size // MB):
                sock.sendall(chunk)
        try:
            return sock.recv(4096)
        except OSError:
            return b""


# ---------------------------------------------------------------------------------------- 1: auth before body
def test_unauthenticated_200mib_bodies_are_refused_without_being_read(server):
    """Finding 1: three concurrent 200 MiB bodies per protocol, no key: 401 / UNAUTHENTICATED, RSS < +50 MB."""
    posts = [
        ("/v1/images/generations", {"Content-Type": "application/json"}),
        ("/v1/images/edits", {"Content-Type": "multipart/form-data; boundary=xyz"}),
    ]
    for path, headers in posts:
        with peak_growth(server.proc.pid) as growth, ThreadPoolExecutor(3) as pool:
            sends = [pool.submit(_raw_post, server.http_port, path, headers, 200 * MB) for _ in range(3)]
            answers = [send.result() for send in sends]
        assert all(a.startswith(b"HTTP/1.1 401") for a in answers), answers
        assert growth[0] < 50 * MB, (path, growth[0] / MB)
    options = [("grpc.max_send_message_length", 300 * MB)]
    big = image_service_pb2.EditImageRequest(prompt="x", images=[b"\0" * (31 * MB)] * 7)  # 217 MiB

    def call(_):
        with grpc.insecure_channel(server.address, options=options) as channel:
            try:
                image_service_pb2_grpc.ImageServiceStub(channel).EditImage(big, timeout=60)
            except grpc.RpcError as error:
                return error.code()

    with peak_growth(server.proc.pid) as growth, ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(call, range(3)))
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert growth[0] < 50 * MB, growth[0] / MB


def test_authenticated_bodies_are_held_to_their_routes_limits_while_streaming(server):
    """A key holder's 200 MiB JSON is 413 before it is read (generations take 1 MiB); a 200 MiB image part stops
    at the part limit (413 naming the part), never reaching the disk."""
    auth = {"Authorization": f"Bearer {KEY_B}"}
    with peak_growth(server.proc.pid) as growth:
        answer = _raw_post(
            server.http_port, "/v1/images/generations", {"Content-Type": "application/json", **auth}, 200 * MB
        )
    assert answer.startswith(b"HTTP/1.1 413") and growth[0] < 20 * MB
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(200):
            yield b"\0" * MB

    with peak_growth(server.proc.pid) as growth:
        with contextlib.suppress(requests.ConnectionError):
            reply = requests.post(
                _url(server, "/v1/images/edits"),
                data=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **auth},
                timeout=60,
            )
            assert reply.status_code == 413 and reply.json()["error"]["param"] == "image", reply.text
    assert growth[0] < 100 * MB, growth[0] / MB  # the part limit (32 MiB) and the parser's copy, at most


# ------------------------------------------------------------------------------------ 2: closed by default
def _outside_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, the kernel picks the source address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_serve_all_without_host_listens_on_loopback_only(server):
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    addresses = [entry["address"] for entry in entries if entry["message"].endswith("listening")]
    # gRPC (gateway and three stages), HTTP and metrics
    assert len(addresses) == 6 and all(a.startswith("127.0.0.1:") for a in addresses), addresses
    outside = _outside_address()
    if outside is not None:  # a host with another interface: nothing answers there
        for port in (server.port, server.http_port, server.metrics_port):
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((outside, port)) != 0, port


def _serve_args(*argv: str) -> argparse.Namespace:
    from imagegen.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_exposure_rules_of_the_cli(tmp_path, caplog, monkeypatch):
    for name in ("IMAGEGEN_HOST", "IMAGEGEN_API_KEYS_FILE", "IMAGEGEN_ALLOW_UNAUTHENTICATED", "IMAGEGEN_METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    args = _serve_args("all", "--model", "/m")
    assert resolve_exposure(args) and (args.host, args.metrics_host) == ("127.0.0.1", "127.0.0.1")
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        resolve_exposure(_serve_args("all", "--model", "/m", "--host", "0.0.0.0"))
    with pytest.raises(ConfigError, match="internal token"):
        resolve_exposure(_serve_args("encoder", "--model", "/m", "--host", "10.0.0.5"))
    with caplog.at_level(logging.WARNING):
        resolve_exposure(_serve_args("gateway", "--host", "0.0.0.0", "--allow-unauthenticated"))
    assert "without API keys" in caplog.text
    keys = tmp_path / "keys"
    keys.write_text(KEY_A)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_exposure(_serve_args("gateway", "--host", "0.0.0.0", "--api-keys-file", str(keys)))
    assert "without TLS" in caplog.text
    token = tmp_path / "token"
    token.write_text("short")
    with pytest.raises(ConfigError, match="16 characters"):
        resolve_exposure(_serve_args("vae", "--model", "/m", "--internal-token-file", str(token)))


# ------------------------------------------------------------------------------------- 3: cost and quotas
def test_work_limit_and_deadline_cap(server):
    """Finding 3/13: a request over --max-request-work is 400 naming the limit before it runs; a deadline of
    1e12 s is cut to --max-timeout (it once overflowed into an immediate 504)."""
    reply = _generate(server, KEY_C, size="1024x1024", num_inference_steps=8)
    assert reply.status_code == 400 and "megapixel-steps" in reply.json()["error"]["message"], reply.text
    with grpc.insecure_channel(server.address) as channel:
        request = image_service_pb2.GenerateImageRequest(prompt="x", width=2048, height=2048, steps=200)
        with pytest.raises(grpc.RpcError) as caught:
            metadata = (("authorization", f"Bearer {KEY_C}"),)
            image_service_pb2_grpc.ImageServiceStub(channel).GenerateImage(request, timeout=30, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "megapixel" in caught.value.details()
    reply = _generate(server, KEY_C, headers={"X-Request-Timeout": "1e12"})
    assert reply.status_code == 200, reply.text


def test_a_flooding_tenant_gets_429_and_the_other_keeps_its_latency(server):
    """Two keys with quotas: A floods (4 threads); it is answered 429 naming its quota while B's requests take
    no more than 1.5x as long as when B is alone."""
    assert _generate(server, KEY_C, **FAIR).status_code == 200  # warm-up, on another key's budget

    def timed(key: str) -> float:
        start = time.perf_counter()
        reply = _generate(server, key, **FAIR)
        assert reply.status_code == 200, reply.text
        return time.perf_counter() - start

    alone = [timed(KEY_B) for _ in range(5)]
    stop, codes, retry_after = threading.Event(), [], []

    def flood() -> None:
        while not stop.is_set():
            reply = _generate(server, KEY_A, **FAIR)
            codes.append(reply.json()["error"]["code"] if reply.status_code == 429 else reply.status_code)
            if reply.status_code == 429:
                retry_after.append(reply.headers.get("Retry-After"))
            time.sleep(0.2)  # 4 callers at ~5 a second each: a flood, without spending this machine's CPU on it

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 120
        while "quota_work_per_minute" not in codes:  # A has spent its minute's work
            assert time.monotonic() < deadline, codes
            time.sleep(0.1)
        flooded = [timed(KEY_B) for _ in range(5)]
        with grpc.insecure_channel(server.address) as channel:  # the gRPC spelling of the same answer
            request = image_service_pb2.GenerateImageRequest(prompt="x", width=256, height=256, steps=8)
            with pytest.raises(grpc.RpcError) as caught:
                image_service_pb2_grpc.ImageServiceStub(channel).GenerateImage(
                    request, timeout=30, metadata=(("authorization", f"Bearer {KEY_A}"),)
                )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    info = parse_error(caught.value)
    assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason in (
        "QUOTA_WORK_PER_MINUTE",
        "QUOTA_IN_FLIGHT",
    )
    assert {"quota_in_flight", "quota_work_per_minute"} <= set(codes), codes
    assert all(value and int(value) >= 1 for value in retry_after)
    assert statistics.median(flooded) <= 1.5 * statistics.median(alone), (alone, flooded)


def test_a_deleted_key_is_refused_within_seconds(server):
    assert _generate(server, KEY_C).status_code == 200
    text = server.keys_file.read_text()
    server.keys_file.write_text(text.replace(f"{KEY_C}\n", ""))
    start = time.monotonic()
    while _generate(server, KEY_C).status_code != 401:
        assert time.monotonic() - start < 3
        time.sleep(0.2)
    reply = requests.get(_url(server, "/v1/models"), headers={"Authorization": f"Bearer {KEY_B}"}, timeout=10)
    assert reply.status_code == 200


# ------------------------------------------------------------------------------------ 5: decompression
def test_zero_filled_8k_pngs_are_refused_before_decoding(edit_server):
    """Finding 5: four 65 KB all-zero 8192^2 PNGs (once +2.45 GB) are refused from their headers: the bound is
    --max-decoded-bytes (256 MiB) of decoded pixels per request, and here nothing is decoded at all."""
    out = io.BytesIO()
    PIL.Image.new("L", (8192, 8192), 0).save(out, "PNG", optimize=True)
    bomb = out.getvalue()
    assert len(bomb) < 100_000
    # A refused edit first, so that the code paths are warm and their first-use memory is not counted below.
    assert _edit(edit_server, KEY_B, images=[b"not an image"]).status_code == 400
    with peak_growth(edit_server.proc.pid) as growth:
        reply = _edit(edit_server, KEY_B, images=[bomb] * 4)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "image", reply.text
    assert "decode to more than" in reply.json()["error"]["message"]
    assert growth[0] < 50 * MB, growth[0] / MB


def test_decoded_bytes_are_checked_from_headers():
    small = _png(64, 64)
    check_decoded_bytes([small] * 3, 3 * 64 * 64 * 4)
    with pytest.raises(InvalidArgument) as caught:
        check_decoded_bytes([small] * 3, 3 * 64 * 64 * 4 - 1)
    assert caught.value.field == "images[2]"
    with pytest.raises(InvalidArgument, match="not a readable image") as caught:
        check_decoded_bytes([b"GIF89a" + b"\0" * 64], 1 << 30)
    assert "0x" not in str(caught.value) and "BytesIO" not in str(caught.value)  # no heap addresses


# ------------------------------------------------------------------------------- 6: half-open connections
def test_a_thousand_half_open_connections_do_not_stop_requests_or_health(server):
    """Finding 6: 1,000 connections that never finish their headers, against a server with 400 fds: a
    legitimate request and a health check still answer, the log does not flood, and the stalled connections
    are closed after the header timeout."""
    log_before = server.log_path.stat().st_size
    sockets = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        start = time.monotonic()
        reply = requests.get(_url(server, "/v1/models"), headers={"Authorization": f"Bearer {KEY_B}"}, timeout=10)
        assert reply.status_code == 200 and time.monotonic() - start < 10
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        assert "server" not in {name.lower() for name in reply.headers}  # no banner (finding 10)
        time.sleep(HEADER_TIMEOUT + 2)
        last = sockets[-1]
        last.settimeout(5)
        try:
            assert last.recv(1) == b""  # closed by the server after the header timeout
        except ConnectionResetError:
            pass  # closed with a reset: as good
    finally:
        for sock in sockets:
            sock.close()
    assert server.log_path.stat().st_size - log_before < 256 << 10


def test_the_loop_exception_log_is_rate_limited(caplog):
    now = [0.0]
    handler = RateLimitedExceptions(interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="imagegen.server"):
        for _ in range(10_000):
            handler(None, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
        now[0] = 11.0
        handler(None, {"message": "socket.accept() out of system resource"})
    records = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(records) == 2 and records[1].repeats == 9_999


# ------------------------------------------------------------------------------------ 7: internal ports
def test_stage_ports_need_the_internal_token(edit_server):
    server = edit_server
    encoder = next(a.split("=", 1)[1] for a in server.proc.args if a.startswith("--encoder="))
    with grpc.insecure_channel(encoder) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        for metadata, ok in ((None, False), ((("x-imagegen-internal-token", "x" * 30),), False)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Describe(common_pb2.DescribeRequest(), timeout=10, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and not ok
        token = (("x-imagegen-internal-token", INTERNAL_TOKEN),)
        assert (
            stub.Describe(common_pb2.DescribeRequest(), timeout=10, metadata=token).model_id == "qwen-image-edit-plus"
        )
    with pytest.raises(RpcFailure):
        InternalToken(INTERNAL_TOKEN).check([("x-imagegen-internal-token", INTERNAL_TOKEN[:-1])])


# ----------------------------------------------------------------------------------- 8-10, 14, 16: echoes
def test_long_user_strings_are_not_echoed(server):
    """Finding 8: a 512 KiB model name gives a short answer and a short log line, on both protocols."""
    log_before = server.log_path.stat().st_size
    auth = {"Authorization": f"Bearer {KEY_B}"}
    reply = requests.post(
        _url(server, "/v1/images/generations"),
        json={"prompt": "x", "model": "M" * (512 << 10)},
        headers=auth,
        timeout=30,
    )
    assert reply.status_code == 400 and len(reply.content) < 1024
    loras = json.dumps({"L" * (32 << 10): 1.0})
    reply = _edit(server, KEY_B, loras=loras)
    assert reply.status_code == 400 and len(reply.content) < 1024
    with grpc.insecure_channel(server.address) as channel:
        request = image_service_pb2.GenerateImageRequest(prompt="x", model="M" * (512 << 10))
        with pytest.raises(grpc.RpcError) as caught:
            metadata = (("authorization", f"Bearer {KEY_B}"),)
            image_service_pb2_grpc.ImageServiceStub(channel).GenerateImage(request, timeout=30, metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(caught.value.details()) < 1024
    assert server.log_path.stat().st_size - log_before < 16 << 10
    assert clip("\ud800" * 100).encode() and len(clip("x" * 10_000)) < 100


def test_malformed_text_origin_and_json_errors_are_clear_400s(server):
    auth = {"Authorization": f"Bearer {KEY_B}", "Content-Type": "application/json"}
    generations = _url(server, "/v1/images/generations")
    for body in (b'{"prompt":"\\ud800"}', b'{"prompt":"x","model":"\\ud800"}', b'{"prompt":"x","loras":{"\\ud800":1}}'):
        reply = requests.post(generations, data=body, headers=auth, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error", body
    reply = requests.post(generations, data=b'{"prompt":', headers=auth, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] is None  # not the byte offset
    reply = requests.post(generations, data=b"{}", headers={**auth, "Origin": "http://evil.example"}, timeout=30)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "origin_refused"
    assert requests.get(_url(server, "/openapi.json"), timeout=10).status_code == 401  # closed surface
    field = image_service_pb2.GenerateImageRequest.DESCRIPTOR.fields_by_name["prompt"].number
    with grpc.insecure_channel(server.address) as channel:  # a string field of bad UTF-8 (a lone surrogate)
        call = channel.unary_unary("/imagegen.v1.ImageService/GenerateImage")
        with pytest.raises(grpc.RpcError) as caught:
            call(
                bytes([field << 3 | 2, 3]) + b"\xed\xa0\x80",
                timeout=10,
                metadata=(("authorization", f"Bearer {KEY_B}"),),
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value


# ------------------------------------------------------------------------------------------- units
def test_keys_fail_closed_take_hashes_and_refuse_short_keys(tmp_path):
    path = tmp_path / "keys"
    hashed = hashlib.sha256(KEY_B.encode()).hexdigest()
    path.write_text(f"{KEY_A}\nsha256:{hashed}\nshort\n")
    keys = ApiKeys(path)
    ids = {keys.check([("authorization", f"Bearer {key}")]) for key in (KEY_A, KEY_B)}
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    with pytest.raises(RpcFailure):
        keys.check([("authorization", "Bearer short")])
    path.unlink()  # revoked by deleting the file: nobody gets in (the last keys are not kept)
    with pytest.raises(RpcFailure):
        keys.check([("authorization", f"Bearer {KEY_A}")])
    path.write_text(f"{KEY_A}\n")
    keys.check([("authorization", f"Bearer {KEY_A}")])
    path.write_text("tiny\n")
    with pytest.raises(ConfigError):
        ApiKeys(path)


def _options(**fields) -> ResolvedOptions:
    base = dict(
        family="qwen-image", prompt="x", negative_prompt=None, width=1024, height=1024, steps=50,
        guidance_scale=4.0, cfg_normalization=0.0, cfg_truncation=1.0, max_sequence_length=512, seed=1, num_images=1,
    )  # fmt: skip
    return ResolvedOptions(**{**base, **fields})


def test_work_counts_pixels_steps_branches_and_images():
    assert request_work(_options()) == 50
    assert request_work(_options(negative_prompt="", num_images=4)) == 400
    with pytest.raises(InvalidArgument, match="megapixel-steps"):
        check_work(_options(width=2048, height=2048, steps=200), 500)


def test_in_flight_and_per_minute_quotas():
    now = [0.0]
    quotas = Quotas(QuotaConfig(key_in_flight=1, key_work_per_minute=60.0, max_active=0), clock=lambda: now[0])
    with quotas.hold("a"):
        with pytest.raises(RpcFailure) as caught, quotas.hold("a"):
            pass
        assert "in_flight" in caught.value.message
        with quotas.hold("b"):  # another key is not affected
            pass
    quotas.charge("a", 50)
    with pytest.raises(RpcFailure) as caught:
        quotas.charge("a", 20)
    details = {type(d): d for d in caught.value.details}
    assert details[error_details_pb2.ErrorInfo].reason == "QUOTA_WORK_PER_MINUTE"
    assert 9 <= details[error_details_pb2.RetryInfo].retry_delay.seconds <= 10  # 10 units at 1 a second
    quotas.charge("b", 60)
    now[0] = 10.0
    quotas.charge("a", 20)


def test_fair_slots_take_keys_in_turn():
    async def scenario() -> list[str]:
        slots, order = FairSlots(1), []
        await slots.acquire("a")  # running

        async def waiter(key: str, index: int) -> None:
            await slots.acquire(key)
            order.append(f"{key}{index}")
            await asyncio.sleep(0)
            slots.release()

        tasks = [asyncio.create_task(waiter("a", i)) for i in range(5)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(waiter("b", 0)))
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order.index("b0") <= 1, order  # FIFO would have run it last
    assert sorted(order) == ["a0", "a1", "a2", "a3", "a4", "b0"]
