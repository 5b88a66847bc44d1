"""The pieces every stage's checks are made of, in process: image decoding, edit geometry, option and tensor
bounds, response sizes, API keys, the SDK's plaintext-key refusal, the job queue's one thread and the health
service's drain."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import load_image
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen_client.sdk import ImageClient, is_loopback

from imagegen.common.denoise import StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families import get_family
from imagegen.common.families.inputs import check_edit_images, decode_inputs
from imagegen.common.images import decode_image
from imagegen.common.options import MAX_SEED, Limits, ModelDefaults, RequestOptions
from imagegen.common.pipeline import resolve_for
from imagegen.common.serving.auth import ApiKeys
from imagegen.common.serving.health import Health
from imagegen.common.serving.jobs import JobQueue
from imagegen.common.serving.status import RpcFailure
from imagegen.common.validation import (
    ModelInputs,
    ResponseTooLarge,
    check_condition,
    check_embeddings,
    check_resolved,
    check_response_size,
    response_bytes,
)
from tests.service_harness import free_port

EDIT = get_family("qwen-image-edit")


def _encoded(image: PIL.Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _picture(width: int, height: int) -> PIL.Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _field(call) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call()
    return caught.value.field


# ------------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb(fmt):
    image = decode_image(_encoded(_picture(20, 10), fmt), "images[0]")
    assert (image.mode, image.size) == ("RGB", (20, 10))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "ICO", "PPM"])
def test_other_formats_are_refused_naming_the_field(fmt):
    data = _encoded(_picture(16, 16), fmt)
    assert PIL.Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    assert _field(lambda: decode_image(data, "images[2]")) == "images[2]"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_diffusers_load_image_does(tmp_path, orientation):
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(_picture(24, 16), "JPEG", exif=exif)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    ours, theirs = decode_image(data), load_image(str(path))
    assert ours.size == theirs.size == ((16, 24) if orientation in (6, 8) else (24, 16))
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_bombs_and_broken_files_are_invalid_arguments():
    bomb = _encoded(PIL.Image.new("1", (5000, 5000)), "PNG")
    with pytest.raises(InvalidArgument, match="5000x5000 pixels"):
        decode_image(bomb, "images[0]", max_pixels=1 << 20)
    good = _encoded(_picture(32, 32), "PNG")
    for data in (b"", good[:40], b"\x89PNG" + bytes(100), b"GIF89a" + bytes(20)):
        assert _field(lambda data=data: decode_image(data, "images[1]")) == "images[1]"


@pytest.mark.parametrize("size", [(1, 8192), (8192, 1), (2, 8192), (8192, 2)])
def test_edit_geometry_refuses_images_that_would_resize_to_nothing(size):
    assert _field(lambda: check_edit_images(EDIT, [(40, 56), size])) == "images[1]"
    # Every stage decodes edit inputs through the same function, which asks the same question.
    data = _encoded(_picture(*size), "PNG")
    assert _field(lambda: decode_inputs([data], EDIT, Limits())) == "images[0]"


def test_ordinary_and_merely_long_images_pass_the_geometry():
    check_edit_images(EDIT, [(40, 56), (1024, 32), (200, 4000)])
    check_edit_images(get_family("z-image"), [(1, 8192)])  # a text-only family has no edit geometry


def test_edit_inputs_are_counted_and_sized_before_any_is_decoded():
    limits = Limits(max_input_bytes=1000)
    small = _encoded(_picture(8, 8), "PNG")
    assert _field(lambda: decode_inputs([small, small], EDIT, limits)) == "images"  # Edit takes one
    assert _field(lambda: decode_inputs([], EDIT, limits)) == "images"
    assert _field(lambda: decode_inputs([bytes(1001)], EDIT, limits)) == "images[0]"
    assert [im.size for im in decode_inputs([small], EDIT, limits)] == [(8, 8)]


# ------------------------------------------------------------------------------------------- options, tensors
def _resolved(**overrides):
    resolved = resolve_for(get_family("z-image"), RequestOptions("a fox", steps=4, seed=1, width=64, height=32), [])
    return dataclasses.replace(resolved, **overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"family": "qwen-image"}, "options.family"),
        ({"width": 2**20}, "options.width"),
        ({"width": 40}, "options.width"),
        ({"height": 0}, "options.height"),
        ({"steps": 10**7}, "options.steps"),
        ({"steps": 0}, "options.steps"),
        ({"num_images": 10**6}, "options.num_images"),
        ({"num_images": 8, "width": 4096, "height": 4096}, "options.num_images"),  # pixels per request
        ({"guidance_scale": float("nan")}, "options.guidance_scale"),
        ({"cfg_truncation": -1.0}, "options.cfg_truncation"),
        ({"max_sequence_length": 0}, "options.max_sequence_length"),
        ({"seed": -1}, "options.seed"),
        ({"num_input_images": 1}, "options.num_input_images"),
        ({"prompt": "nul \x00"}, "options.prompt"),
    ],
)
def test_internal_options_are_checked_against_the_same_limits(overrides, field):
    family = get_family("z-image")
    check_resolved(_resolved(), family.name, family.defaults, Limits())
    assert _field(lambda: check_resolved(_resolved(**overrides), family.name, family.defaults, Limits())) == field


def test_internal_options_obey_the_cfg_rules_of_resolve_options():
    """The rules `check_resolved` once skipped: CFG options only where the family has them, a negative prompt
    only where guidance runs CFG, and the seed bound `resolve_options` uses."""
    qwen = get_family("qwen-image")
    resolved = resolve_for(qwen, RequestOptions("a fox", steps=2, seed=1, width=64, height=32), [])
    check_resolved(resolved, qwen.name, qwen.defaults, Limits())
    for name in ("cfg_normalization", "cfg_truncation"):
        assert _field(lambda n=name: resolve_for(qwen, RequestOptions("a fox", **{n: 0.5}), [])) == name
        bad = dataclasses.replace(resolved, **{name: 0.5})
        assert _field(lambda b=bad: check_resolved(b, qwen.name, qwen.defaults, Limits())) == f"options.{name}"
    z = get_family("z-image")
    unguided = _resolved(guidance_scale=0.0, negative_prompt="blurry")  # resolve_options drops it there
    request = RequestOptions("a fox", guidance_scale=0.0, negative_prompt="blurry")
    assert resolve_for(z, request, []).negative_prompt is None
    assert _field(lambda: check_resolved(unguided, z.name, z.defaults, Limits())) == "options.negative_prompt"
    check_resolved(_resolved(seed=MAX_SEED), z.name, z.defaults, Limits())
    assert _field(lambda: check_resolved(_resolved(seed=MAX_SEED + 1), z.name, z.defaults, Limits())) == "options.seed"


def test_model_defaults_fill_what_the_request_leaves_unset():
    """A deployment's defaults replace the family's; the request's own values still win."""
    z = get_family("z-image")
    turbo = ModelDefaults(steps=8, guidance_scale=0.0, width=512, height=256, negative_prompt="x")
    plain = resolve_for(z, RequestOptions("a fox"), [])
    assert (plain.steps, plain.guidance_scale, plain.width, plain.negative_prompt) == (50, 5.0, 1024, "")
    resolved = resolve_for(z, RequestOptions("a fox"), [], model=turbo)
    assert (resolved.steps, resolved.guidance_scale, resolved.width, resolved.height) == (8, 0.0, 512, 256)
    assert resolved.negative_prompt is None  # guidance 0 runs no CFG
    own = resolve_for(z, RequestOptions("a fox", steps=3, guidance_scale=2.0, width=64), [], model=turbo)
    assert (own.steps, own.guidance_scale, own.width, own.negative_prompt) == (3, 2.0, 64, "x")
    assert _field(lambda: resolve_for(z, RequestOptions("a fox"), [], model=ModelDefaults(steps=10**6))) == "steps"


def test_response_size_is_bounded_up_front():
    assert response_bytes(8, 4096, 4096, "NPY") > 1.6e9  # the 8 x 4096^2 NPY response
    with pytest.raises(ResponseTooLarge):
        check_response_size(8, 4096, 4096, "NPY", Limits())
    check_response_size(8, 2048, 2048, "PNG", Limits())  # ~134 MB at worst: within the default 512 MiB


def test_embeddings_and_conditions_are_checked_against_the_model():
    inputs = ModelInputs(
        embedding_dim=64, max_text_tokens=100, condition_channels=64, max_condition_tokens=16, max_grid_side=4096
    )
    check_embeddings(torch.zeros(7, 64), "prompt_embeds", "prompt", inputs)
    cases = {
        "prompt_embeds": [
            torch.zeros(7, 65),
            torch.zeros(7),
            torch.zeros(0, 64),
            torch.zeros(7, 64, dtype=torch.int64),
            torch.full((7, 64), float("nan")),
        ],
        "prompt": [torch.zeros(101, 64)],  # more tokens than the RoPE tables hold: named after the prompt
    }
    for field, tensors in cases.items():
        for tensor in tensors:
            assert _field(lambda t=tensor: check_embeddings(t, "prompt_embeds", "prompt", inputs)) == field
    options = resolve_for(EDIT, RequestOptions("x", width=32, height=32), [_picture(40, 56)])
    check_condition(torch.zeros(1, 6, 64), [(1, 2, 3)], options, inputs, Limits())
    bad = {
        "condition.safetensors": (torch.zeros(1, 7, 64), [(1, 2, 3)]),
        "condition.shapes[0].frames": (torch.zeros(1, 6, 64), [(2, 2, 3)]),
        "condition.shapes[0].rows": (torch.zeros(1, 6, 64), [(1, 0, 3)]),
        "condition.shapes[0]": (torch.zeros(1, 20, 64), [(1, 4, 5)]),  # over max_condition_tokens
        "condition.shapes": (torch.zeros(1, 6, 64), [(1, 2, 3), (1, 1, 1)]),
        "condition": (None, []),
    }
    for field, (latents, shapes) in bad.items():
        assert _field(lambda lt=latents, sh=shapes: check_condition(lt, sh, options, inputs, Limits())) == field


# ----------------------------------------------------------------------------------------------- keys and SDK
def test_api_key_file_comments_bom_and_crlf(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes("\ufeffalpha-key-0001\r\n  # rotated 2026-01\r\n\t#another note\r\n  beta-key-0002  \r\n".encode())
    keys = ApiKeys(path)
    for key in ("alpha-key-0001", "beta-key-0002"):
        keys.check([("authorization", f"Bearer {key}")])
    for token in ("# rotated 2026-01", "#another note", "\ufeffalpha-key-0001"):
        with pytest.raises(RpcFailure) as caught:
            keys.check([("authorization", f"Bearer {token}")])
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Only digests are kept: equal length whatever the key, so comparing tells nothing about a key's length.
    assert {len(k) for k in keys._keys} == {32} and all(b"key" not in k for k in keys._keys)


@pytest.mark.parametrize(
    "target, loopback",
    [
        ("localhost:50051", True),
        ("127.0.0.1:50051", True),
        ("127.8.9.1:1", True),
        ("[::1]:50051", True),
        ("unix:/tmp/gateway.sock", True),
        ("dns:///localhost:50051", True),
        ("10.0.0.5:50051", False),
        ("gateway.example.com:443", False),
        ("[2001:db8::1]:50051", False),
    ],
)
def test_loopback_targets(target, loopback):
    assert is_loopback(target) is loopback


def test_sdk_refuses_a_plaintext_key_to_another_host_unless_told():
    with pytest.raises(ValueError, match="plaintext"):
        ImageClient("10.0.0.5:50051", api_key="secret-key-123")
    for kwargs in ({"allow_plaintext_key": True}, {"tls": True}):
        ImageClient("10.0.0.5:50051", api_key="secret-key-123", **kwargs).close()
    ImageClient("127.0.0.1:50051", api_key="secret-key-123").close()
    ImageClient("10.0.0.5:50051").close()  # no key: nothing to protect


# --------------------------------------------------------------------------------------- queue thread, health
def test_idle_callback_and_finish_run_on_the_queue_thread_and_a_closed_loop_does_not_kill_it():
    threads: dict[str, set] = {"idle": set(), "job": set(), "finish": set()}
    idled = threading.Event()

    def idle() -> None:
        threads["idle"].add(threading.get_ident())
        idled.set()

    def job(hooks: StepHooks) -> str:
        threads["job"].add(threading.get_ident())
        return "done"

    async def submit(queue: JobQueue):
        ticket = queue.submit(job)
        return [event async for event in ticket.events()][-1]

    def run(jobs: list, hooks: list[StepHooks]) -> list:
        return [job(h) for job, h in zip(jobs, hooks, strict=True)]

    finish = lambda: threads["finish"].add(threading.get_ident())  # noqa: E731
    queue = JobQueue(2, run, "test", idle=(0.05, idle), finish=finish)
    assert idled.wait(5), "no idle callback while idle"
    assert asyncio.run(submit(queue)).result == "done"
    # A job whose event loop has closed (the RPC's loop at shutdown) posts into nothing; the worker lives on.
    loop = asyncio.new_event_loop()
    orphan = loop.run_until_complete(_submit_only(queue, job))
    loop.close()
    assert asyncio.run(submit(queue)).result == "done"
    assert queue.close(10)
    del orphan
    assert len(threads["idle"] | threads["job"] | threads["finish"]) == 1


async def _submit_only(queue: JobQueue, work):
    return queue.submit(work)


def test_health_watch_streams_end_when_the_process_drains():
    async def scenario():
        server = grpc.aio.server()
        health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await stream.read()
            await health.drain()
            rest = []
            while (reply := await stream.read()) is not grpc.aio.EOF:  # it ends: a graceful stop need not wait
                rest.append(reply.status)
            await health.set("", health_pb2.HealthCheckResponse.SERVING)  # ignored once draining
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            await server.stop(0)
        return first.status, rest, check.status

    first, rest, after = asyncio.run(scenario())
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert (first, rest, after) == (serving, [not_serving], not_serving)
