"""Hostile input at every stage: a hypothesis fuzz of the public API and of every internal API, plus named
regression tests for the cases that once gave INTERNAL or wedged a stage.

Two `serve all` processes on tiny checkpoints (qwen-image-edit with Redis, z-image without) expose the gateway and
the encoder, denoiser and VAE APIs on loopback, with small limits so that whatever the fuzz makes valid stays
cheap. Each generated request starts from a valid one and has a few fields replaced by hostile values (out of
range, NaN, wrong shapes and dtypes, garbage bytes, image bombs, unknown enums ...). Every answer must be OK,
INVALID_ARGUMENT naming a field, RESOURCE_EXHAUSTED or FAILED_PRECONDITION: never INTERNAL or UNKNOWN, never a
hang (a call's own timeout), and no process may die.

IMAGEGEN_FUZZ_EXAMPLES scales the number of generated requests per API (CI: the default, 1,000+ in all).
"""

from __future__ import annotations

import io
import os
import re
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import PIL.Image
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen.common.serving.status import parse_error
from imagegen.common.tiny import QWEN3_HIDDEN, QWEN_TEXT_HIDDEN, tiny_checkpoint_cached
from imagegen.common.wire import LATENTS, pack
from imagegen.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from tests.service_harness import TORCH_THREADS, RedisServer, Service, free_port, internal_channel, stop_all, token_env

EDIT, ZIMAGE = "qwen-image-edit", "z-image"
EMBED_DIM = {EDIT: QWEN_TEXT_HIDDEN, ZIMAGE: QWEN3_HIDDEN}
MAX_SIDE, MAX_STEPS, MAX_IMAGES = 64, 3, 2
LIMITS = [
    f"--max-side={MAX_SIDE}",
    f"--max-steps={MAX_STEPS}",
    f"--max-images={MAX_IMAGES}",
    f"--max-request-pixels={2 * MAX_SIDE * MAX_SIDE}",
    "--max-response-bytes=65536",  # two 64x64 NPY images are more: RESOURCE_EXHAUSTED
    f"--max-input-bytes={1 << 20}",
    f"--max-input-pixels={1 << 20}",
    f"--max-message-bytes={8 << 20}",
]
EXAMPLES = int(os.environ.get("IMAGEGEN_FUZZ_EXAMPLES", "220"))  # per API group: 1,100 requests in all
CALL_TIMEOUT = 60.0
ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests on every run: CI results reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# -------------------------------------------------------------------------------------------------- the stack
@dataclass
class Stack:
    servers: dict[str, Service]
    redis: RedisServer
    channels: dict[str, grpc.Channel]
    outcomes: Counter

    def gateway(self, model: str) -> image_service_pb2_grpc.ImageServiceStub:
        return image_service_pb2_grpc.ImageServiceStub(self.channels[f"{model}/gateway"])

    def encoder(self, model: str) -> encoder_pb2_grpc.EncoderServiceStub:
        return encoder_pb2_grpc.EncoderServiceStub(self.channels[f"{model}/encoder"])

    def denoiser(self, model: str) -> denoiser_pb2_grpc.DenoiserServiceStub:
        return denoiser_pb2_grpc.DenoiserServiceStub(self.channels[f"{model}/denoiser"])

    def vae(self, model: str) -> vae_pb2_grpc.VaeServiceStub:
        return vae_pb2_grpc.VaeServiceStub(self.channels[f"{model}/vae"])

    def check(self, api: str, call) -> grpc.StatusCode:
        """Make one call (a unary call, or a stream to drain) and assert the answer is an accepted one."""
        start = time.monotonic()
        try:
            result = call()
            if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
                list(result)
            code, details = grpc.StatusCode.OK, None
        except grpc.RpcError as error:
            details = parse_error(error)
            code = details.code
        self.outcomes[api, code.name] += 1
        elapsed = time.monotonic() - start
        assert code in ACCEPTED, f"{api}: {code.name} after {elapsed:.1f}s: {details.message if details else ''}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert details.field_violations, f"{api}: INVALID_ARGUMENT without a field: {details.message}"
        for name, server in self.servers.items():
            assert server.alive(), f"{name} died: {server.log()[-3000:]}"
        return code


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fuzz-logs")
    redis_server = RedisServer(logs)
    servers: dict[str, Service] = {}
    addresses: dict[str, str] = {}
    try:
        for model, cache in ((EDIT, ["--redis-url", redis_server.url]), (ZIMAGE, [])):
            stages = {stage: f"127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")}
            args = ["--model", str(tiny_checkpoint_cached(model)), "--model-id", model, *LIMITS, *cache]
            args += [f"--{stage}={address}" for stage, address in stages.items()]
            servers[model] = Service(f"all-{model}", "all", args, logs, env=token_env(logs))
            addresses.update({f"{model}/{stage}": address for stage, address in stages.items()})
        for model, server in servers.items():
            server.wait_serving(timeout=180)
            addresses[f"{model}/gateway"] = server.address
        # The stages require `serve all`'s internal token (issue 20); the gateway takes anyone (no keys).
        channels = {
            name: grpc.insecure_channel(address) if name.endswith("/gateway") else internal_channel(address)
            for name, address in addresses.items()
        }
        yield Stack(servers, redis_server, channels, Counter())
        for channel in channels.values():
            channel.close()
    finally:
        stop_all([*servers.values(), redis_server])


# ------------------------------------------------------------------------------------------------ input values
def _encoded(image: PIL.Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _picture(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _exif_jpeg(width: int, height: int, orientation: int, seed: int = 0) -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    return _encoded(_picture(width, height, seed), "JPEG", exif=exif, quality=95)


def _bomb() -> bytes:
    """A few kilobytes of PNG that decode to 25 megapixels."""
    return _encoded(PIL.Image.new("1", (5000, 5000)), "PNG")


BOMB = _bomb()
VALID_IMAGE = st.builds(
    lambda fmt, w, h, seed: _encoded(_picture(w, h, seed), fmt),
    st.sampled_from(["PNG", "JPEG", "WEBP"]),
    st.integers(8, 64),
    st.integers(8, 64),
    st.integers(0, 3),
)
HOSTILE_IMAGE = st.one_of(
    st.builds(lambda w, h, o: _exif_jpeg(w, h, o), st.integers(8, 48), st.integers(8, 48), st.integers(0, 12)),
    st.builds(
        lambda fmt, w, h: _encoded(_picture(w, h), fmt),
        st.sampled_from(["GIF", "TIFF", "BMP", "ICO"]),
        st.integers(1, 32),
        st.integers(1, 32),
    ),
    st.sampled_from(
        [BOMB, b"", b"\x89PNG\r\n\x1a\n", _encoded(_picture(1, 8192), "PNG"), _encoded(_picture(8192, 1), "PNG")]
    ),
    st.builds(lambda data, cut: data[:cut], VALID_IMAGE, st.integers(0, 200)),  # truncated
    st.binary(max_size=512),
    st.builds(lambda data: b"\x89PNG" + data, st.binary(max_size=256)),
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
HOSTILE_TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=500),
    st.sampled_from(["", "\x00", "nul \x00 inside", "红狐" * 300, "x" * 8193]),
)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 15, 17, 63, 65, 4096, 2**20, 10**7]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 2**63 - 1]))
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, 1e300, -0.0]))
FORMAT = st.integers(-3, 12)


def _tensor_blob(shape: tuple[int, ...], dtype: torch.dtype, fill: str, name: str, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator)
    if fill == "nan" and tensor.numel():
        tensor.view(-1)[0] = float("nan")
    if fill == "inf" and tensor.numel():
        tensor.view(-1)[-1] = float("inf")
    return pack(tensor.to(dtype), name)


HOSTILE_TENSOR = st.one_of(
    st.builds(
        _tensor_blob,
        st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple),
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]),
        st.sampled_from(["normal", "nan", "inf"]),
        st.sampled_from(["embeds", LATENTS, "other"]),
        st.integers(0, 3),
    ),
    st.binary(max_size=300),
    st.builds(lambda n: n.to_bytes(8, "little") + b"{}", st.integers(0, 2**64 - 1)),  # huge header length
)


def near_tensor(name: str, shape: tuple[int, ...]):
    """Blobs one step from a valid tensor (an axis off, a rank more or less, another dtype, NaN or inf, another
    name), or anything at all."""

    @st.composite
    def build(draw) -> bytes:
        # Choices from a hypothesis-seeded Random: nested draws of hypothesis' own tend to repeat one choice.
        rng = draw(st.randoms(use_true_random=False))
        dims, dtype, fill, tensor_name = list(shape), torch.float32, "normal", name
        change = rng.choice(["axis", "axis", "rank", "dtype", "nan", "inf", "name"])
        if change == "axis":
            axis = rng.randrange(len(dims))
            dims[axis] = max(0, rng.choice([0, 1, dims[axis] - 1, dims[axis] + 1, 2 * dims[axis], 5000]))
        elif change == "rank":
            dims = dims[:-1] if rng.random() < 0.5 else [*dims, rng.randint(1, 3)]
        elif change == "dtype":
            dtype = rng.choice([torch.float64, torch.int64, torch.uint8, torch.bool, torch.int8])
        elif change == "name":
            tensor_name = rng.choice(["embeds", LATENTS, "other", ""])
        else:
            fill = change
        if np.prod(dims) * 4 > 4 << 20:  # keep messages small: the limits are tested elsewhere
            dims[0] = 1
        return _tensor_blob(tuple(dims), dtype, fill, tensor_name, rng.randrange(4))

    return st.one_of(build(), build(), build(), HOSTILE_TENSOR)


def grid_exact(rows: int, cols: int) -> denoiser_pb2.TokenGrid:
    return denoiser_pb2.TokenGrid(frames=1, rows=rows, cols=cols)


def _mutate(draw, base: dict, hostile: dict, at_least: int, counts: tuple[int, ...] = (0, 1, 1, 2, 2, 3)) -> dict:
    """`base` with a few fields (at least `at_least`) replaced by hostile values, or removed."""
    rng = draw(st.randoms(use_true_random=False))  # which fields: uniform, see `near_tensor`
    fields = dict(base)
    names = sorted(hostile)
    for _ in range(rng.choice([n for n in counts if n >= at_least])):
        name = rng.choice(names)
        if rng.random() < 0.1:
            fields.pop(name, None)
        else:
            fields[name] = draw(hostile[name])
    return fields


# -------------------------------------------------------------------------------------------- public requests
# The request options both the public request and the internal `ResolvedOptions` carry.
OPTION_FIELDS_HOSTILE = {
    "prompt": HOSTILE_TEXT,
    "negative_prompt": HOSTILE_TEXT,
    "width": INT32,
    "height": INT32,
    "steps": INT32,
    "guidance_scale": FLOAT,
    "cfg_normalization": FLOAT,
    "cfg_truncation": FLOAT,
    "max_sequence_length": INT32,
    "seed": INT64,
    "num_images": INT32,
}
PUBLIC_HOSTILE = {
    **OPTION_FIELDS_HOSTILE,
    "output_format": FORMAT,
    "model": st.one_of(st.sampled_from(["", EDIT, ZIMAGE, "nope"]), TEXT),
    "request_id": st.one_of(st.sampled_from(["", "ok-id", "has space"]), TEXT),
}


@st.composite
def generate_requests(draw) -> image_service_pb2.GenerateImageRequest:
    base = {
        "model": ZIMAGE,
        "prompt": draw(TEXT),
        "width": draw(st.sampled_from([16, 32, 48, 64])),
        "height": draw(st.sampled_from([16, 32])),
        "steps": draw(st.integers(1, MAX_STEPS)),
        "guidance_scale": draw(st.sampled_from([0.0, 1.5, 4.0])),
        "seed": draw(st.integers(0, 2**63 - 1)),
        "num_images": draw(st.integers(1, 2)),
        "output_format": draw(st.sampled_from([0, 1, 2, 3, 4])),
    }
    return image_service_pb2.GenerateImageRequest(**_mutate(draw, base, PUBLIC_HOSTILE, 0))


@st.composite
def edit_requests(draw) -> image_service_pb2.EditImageRequest:
    """Edits whose images and fields are hostile. A valid edit costs seconds (the VAE encodes every input at
    1024^2), so the base asks for a response over the size limit: every check runs (images decoded, geometry,
    options), then RESOURCE_EXHAUSTED before any backend, unless a mutation happens to make it valid."""
    base = {
        "model": EDIT,
        "prompt": draw(TEXT),
        "images": [draw(VALID_IMAGE)],
        "width": MAX_SIDE,
        "height": MAX_SIDE,
        "steps": 2,
        "seed": draw(st.integers(0, 100)),
        "num_images": 2,
        "output_format": common_pb2.OUTPUT_FORMAT_NPY,
    }
    hostile = {**PUBLIC_HOSTILE, "images": st.lists(st.one_of(HOSTILE_IMAGE, VALID_IMAGE), max_size=3)}
    return image_service_pb2.EditImageRequest(**_mutate(draw, base, hostile, 0))


# ------------------------------------------------------------------------------------------ internal requests
def _options(model: str, **overrides) -> dict:
    options = {
        "family": model,
        "prompt": "x",
        "width": 32,
        "height": 16,
        "steps": 2,
        "guidance_scale": 1.0,
        "cfg_normalization": 0.0,
        "cfg_truncation": 1.0,
        "max_sequence_length": 512,
        "seed": 1,
        "num_images": 1,
        "num_input_images": 1 if model == EDIT else 0,
    }
    return {**options, **overrides}


OPTIONS_HOSTILE = {
    "family": st.one_of(st.sampled_from([EDIT, ZIMAGE, "qwen-image", ""]), TEXT),
    **OPTION_FIELDS_HOSTILE,
    "num_input_images": INT32,
}


@st.composite
def denoise_requests(draw) -> tuple[str, denoiser_pb2.DenoiseRequest]:
    """A valid job for either model (random embeddings of the model's width; edit: a small condition), with a
    few options or tensors made hostile."""
    model = draw(st.sampled_from([EDIT, ZIMAGE]))
    length = draw(st.integers(1, 12))
    blob = _tensor_blob((length, EMBED_DIM[model]), torch.float32, "", "embeds", 0)
    base = {f"options.{name}": value for name, value in _options(model).items()}
    base["prompt_embeds"] = encoder_pb2.Embeddings(safetensors=blob)
    if model == EDIT:
        rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        base["condition"] = denoiser_pb2.ConditionLatents(
            safetensors=_tensor_blob((1, rows * cols, 64), torch.float32, "", LATENTS, 1),
            shapes=[denoiser_pb2.TokenGrid(frames=1, rows=rows, cols=cols)],
        )
    # Structure from a seeded Random (see `near_tensor`), leaf values from hypothesis.
    rng = draw(st.randoms(use_true_random=False))

    def embeddings() -> encoder_pb2.Embeddings:
        kind = rng.choice(["near", "near", "near", "key", "empty"])
        if kind == "near":
            return encoder_pb2.Embeddings(safetensors=draw(near_tensor("embeds", (length, EMBED_DIM[model]))))
        if kind == "key":
            return encoder_pb2.Embeddings(key=rng.choice(["poisoned", "imagegen:emb:v1:gone"]))
        return encoder_pb2.Embeddings()

    def condition() -> denoiser_pb2.ConditionLatents:
        """Near the valid one: the tensor off, or its grids off, or anything."""
        rows, cols = (base["condition"].shapes[0].rows, base["condition"].shapes[0].cols) if model == EDIT else (2, 2)

        def grid() -> denoiser_pb2.TokenGrid:
            frames, r, c = 1, rows, cols
            axis = rng.randrange(4)
            if axis < 3:
                value = rng.choice([0, -1, 2, 10**6, draw(INT32)])
                frames, r, c = (value, r, c) if axis == 0 else (frames, value, c) if axis == 1 else (frames, r, value)
            return denoiser_pb2.TokenGrid(frames=frames, rows=r, cols=c)

        kind = rng.choice(["tensor", "tensor", "grids", "grids", "anything"])
        exact = _tensor_blob((1, rows * cols, 64), torch.float32, "", LATENTS, 1)
        if kind == "tensor":
            blob, grids = draw(near_tensor(LATENTS, (1, rows * cols, 64))), [grid_exact(rows, cols)]
        elif kind == "grids":
            blob, grids = exact, [grid() for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        else:
            blob, grids = draw(HOSTILE_TENSOR), [grid() for _ in range(rng.randrange(4))]
        return denoiser_pb2.ConditionLatents(safetensors=blob, shapes=grids)

    makers = {"prompt_embeds": embeddings, "negative_embeds": embeddings, "condition": condition}
    target = rng.choice(["none", "options", "prompt_embeds", "negative_embeds", "condition", "condition", "mixed"])
    fields = dict(base)
    if target in ("options", "mixed"):
        options_hostile = {f"options.{name}": value for name, value in OPTIONS_HOSTILE.items()}
        fields = _mutate(draw, fields, options_hostile, 1)
    if target in makers:
        fields[target] = makers[target]()
    if target == "mixed":
        for name in rng.sample(sorted(makers), rng.randint(1, 3)):
            fields[name] = makers[name]()
    options = {name.removeprefix("options."): v for name, v in fields.items() if name.startswith("options.")}
    parts = {name: v for name, v in fields.items() if not name.startswith("options.")}
    request = denoiser_pb2.DenoiseRequest(
        options=denoiser_pb2.ResolvedOptions(**options), progress=draw(st.booleans()), **parts
    )
    return model, request


@st.composite
def decode_requests(draw) -> tuple[str, vae_pb2.DecodeRequest]:
    model = draw(st.sampled_from([EDIT, ZIMAGE]))
    width, height, count = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32])), draw(st.integers(1, 2))
    shape = (count, 16, height // 8, width // 8) if model == ZIMAGE else (count, (height // 16) * (width // 16), 64)
    base = {
        "latents": _tensor_blob(shape, torch.float32, "", LATENTS, 2),
        "width": width,
        "height": height,
        "output_format": draw(st.sampled_from([0, 1, 2, 3, 4])),
    }
    target = draw(st.randoms(use_true_random=False)).choice(["none", "latents", "latents", "fields", "both"])
    fields = dict(base)
    if target in ("fields", "both"):
        fields = _mutate(draw, fields, {"width": INT32, "height": INT32, "output_format": FORMAT}, 1)
    if target in ("latents", "both"):
        fields["latents"] = draw(near_tensor(LATENTS, shape))
    return model, vae_pb2.DecodeRequest(**fields)


@st.composite
def encode_requests(draw) -> tuple[str, object]:
    """Encoder `Encode` for either model, or the VAE's `EncodeCondition` of the edit model."""
    model = draw(st.sampled_from([EDIT, ZIMAGE]))
    images = [draw(VALID_IMAGE)] if model == EDIT else []
    image_lists = st.lists(st.one_of(HOSTILE_IMAGE, VALID_IMAGE), max_size=3)
    if model == EDIT and draw(st.booleans()):
        fields = _mutate(draw, {"images": images}, {"images": image_lists}, 1)
        return "EncodeCondition", vae_pb2.EncodeConditionRequest(**fields)
    base = {"prompt": draw(TEXT), "max_sequence_length": draw(st.integers(1, 64)), "images": images, "inline": True}
    hostile = {"prompt": HOSTILE_TEXT, "max_sequence_length": INT32, "images": image_lists, "inline": st.booleans()}
    # Valid edit encodes cost more than a second: those that run at all are a few.
    at_least = 1 if model == EDIT and draw(st.integers(0, 9)) else 0
    return model, encoder_pb2.EncodeRequest(**_mutate(draw, base, hostile, at_least))


# ------------------------------------------------------------------------------------------------- the fuzzing
def test_fuzz_public_generate(stack):
    @FUZZ
    @given(request=generate_requests())
    def run(request):
        target = EDIT if request.model == EDIT else ZIMAGE
        stack.check("GenerateImage", lambda: stack.gateway(target).GenerateImage(request, timeout=CALL_TIMEOUT))

    run()
    assert sum(n for (api, _), n in stack.outcomes.items() if api == "GenerateImage") >= EXAMPLES
    assert stack.outcomes["GenerateImage", "OK"] > 0 and stack.outcomes["GenerateImage", "INVALID_ARGUMENT"] > 0


def test_fuzz_public_edit(stack):
    @FUZZ
    @given(request=edit_requests(), stream=st.booleans())
    def run(request, stream):
        target = ZIMAGE if request.model == ZIMAGE else EDIT
        gateway = stack.gateway(target)
        method = gateway.EditImageStream if stream else gateway.EditImage
        stack.check("EditImage", lambda: method(request, timeout=CALL_TIMEOUT))

    run()
    assert sum(n for (api, _), n in stack.outcomes.items() if api == "EditImage") >= EXAMPLES
    assert stack.outcomes["EditImage", "INVALID_ARGUMENT"] > 0


def test_fuzz_internal_denoiser(stack):
    client = redis.Redis.from_url(stack.redis.url)
    client.set("poisoned", b"not a safetensors blob")  # a poisoned cache entry must be the caller's error
    client.close()

    @FUZZ
    @given(case=denoise_requests())
    def run(case):
        model, request = case
        stack.check("Denoise", lambda: stack.denoiser(model).Denoise(request, timeout=CALL_TIMEOUT))

    run()
    assert stack.outcomes["Denoise", "OK"] > 0 and stack.outcomes["Denoise", "INVALID_ARGUMENT"] > 0


def test_fuzz_internal_encoders(stack):
    @FUZZ
    @given(case=encode_requests())
    def run(case):
        model, request = case
        if model == "EncodeCondition":
            stack.check("EncodeCondition", lambda: stack.vae(EDIT).EncodeCondition(request, timeout=CALL_TIMEOUT))
        else:
            stack.check("Encode", lambda: stack.encoder(model).Encode(request, timeout=CALL_TIMEOUT))

    run()
    assert stack.outcomes["Encode", "OK"] > 0 and stack.outcomes["Encode", "INVALID_ARGUMENT"] > 0


def test_fuzz_internal_vae_decode(stack):
    @FUZZ
    @given(case=decode_requests())
    def run(case):
        model, request = case
        stack.check("Decode", lambda: stack.vae(model).Decode(request, timeout=CALL_TIMEOUT))

    run()
    assert stack.outcomes["Decode", "OK"] > 0 and stack.outcomes["Decode", "INVALID_ARGUMENT"] > 0


def test_fuzz_made_enough_requests_and_everything_still_serves(stack):
    print("fuzz outcomes:", dict(sorted(stack.outcomes.items())))
    assert sum(stack.outcomes.values()) >= 5 * EXAMPLES, dict(stack.outcomes)
    for server in stack.servers.values():
        assert server.alive() and server.health() == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------ named regression tests
def _violation(call) -> tuple[grpc.StatusCode, list[str], float]:
    start = time.monotonic()
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)
    except grpc.RpcError as error:
        details = parse_error(error)
        return details.code, [f for f, _ in details.field_violations], time.monotonic() - start
    return grpc.StatusCode.OK, [], time.monotonic() - start


def test_long_edit_prompt_is_invalid_argument_naming_the_prompt(stack):
    """~1,600 words overflow Qwen's 4,096 text RoPE rows (this tiny tokenizer makes several tokens of each): once
    an IndexError answered as INTERNAL, now refused by the denoiser with the limit read from its tables, and
    relayed by the gateway naming the prompt."""
    prompt = " ".join(["红狐"] * 1600)
    request = image_service_pb2.EditImageRequest(
        model=EDIT, prompt=prompt, images=[_encoded(_picture(40, 56), "PNG")], width=32, height=32, steps=2, seed=0
    )
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stack.gateway(EDIT).EditImage(request, timeout=120)
    details = parse_error(caught.value)
    assert (details.code, [f for f, _ in details.field_violations]) == (grpc.StatusCode.INVALID_ARGUMENT, ["prompt"])
    # The limit comes from the model's 4,096 positive RoPE rows, less the largest half side of the image grids.
    limit = int(re.search(r"at most (\d+)", details.message).group(1))
    assert 3900 < limit < 4096 and time.monotonic() - start < 60, details.message
    assert all(server.alive() for server in stack.servers.values())


@pytest.mark.parametrize(
    "field, value",
    [("width", 2**20), ("steps", 10**7), ("num_images", 10**6), ("height", -16), ("seed", -1)],
)
def test_huge_internal_jobs_are_invalid_argument_and_the_denoiser_serves_on(stack, field, value):
    embeds = _tensor_blob((5, EMBED_DIM[ZIMAGE]), torch.float32, "", "embeds", 0)
    job = dict(prompt_embeds=encoder_pb2.Embeddings(safetensors=embeds))
    huge = denoiser_pb2.DenoiseRequest(
        options=denoiser_pb2.ResolvedOptions(**_options(ZIMAGE, **{field: value})), **job
    )
    code, fields, took = _violation(lambda: stack.denoiser(ZIMAGE).Denoise(huge, timeout=30))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [f"options.{field}"]) and took < 5
    fine = denoiser_pb2.DenoiseRequest(options=denoiser_pb2.ResolvedOptions(**_options(ZIMAGE)), **job)
    code, _, took = _violation(lambda: stack.denoiser(ZIMAGE).Denoise(fine, timeout=30))
    assert code == grpc.StatusCode.OK and took < 10


def test_decompression_bombs_are_refused_at_every_stage(stack):
    public = image_service_pb2.EditImageRequest(model=EDIT, prompt="x", images=[BOMB], width=32, height=32, steps=2)
    calls = {
        "gateway": lambda: stack.gateway(EDIT).EditImage(public, timeout=30),
        "encoder": lambda: stack.encoder(EDIT).Encode(
            encoder_pb2.EncodeRequest(prompt="x", max_sequence_length=8, images=[BOMB]), timeout=30
        ),
        "vae": lambda: stack.vae(EDIT).EncodeCondition(vae_pb2.EncodeConditionRequest(images=[BOMB]), timeout=30),
    }
    for stage, call in calls.items():
        code, fields, took = _violation(call)
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["images[0]"]) and took < 5, stage


@pytest.mark.parametrize("size", [(1, 8192), (8192, 1), (2, 8192)])
def test_extreme_aspect_ratios_are_invalid_argument_at_every_stage(stack, size):
    """The edit geometry would round the resized image to 0 pixels wide (once a ValueError -> INTERNAL)."""
    image = _encoded(_picture(*size), "PNG")
    public = image_service_pb2.EditImageRequest(model=EDIT, prompt="x", images=[image], width=32, height=32, steps=2)
    calls = {
        "gateway": lambda: stack.gateway(EDIT).EditImage(public, timeout=30),
        "encoder": lambda: stack.encoder(EDIT).Encode(
            encoder_pb2.EncodeRequest(prompt="x", max_sequence_length=8, images=[image]), timeout=30
        ),
        "vae": lambda: stack.vae(EDIT).EncodeCondition(vae_pb2.EncodeConditionRequest(images=[image]), timeout=30),
    }
    for stage, call in calls.items():
        assert _violation(call)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, ["images[0]"]), stage


def test_exif_rotated_jpeg_is_edited_upright_as_diffusers_load_image_does(stack, tmp_path):
    from diffusers import QwenImageEditPipeline
    from diffusers.utils import load_image

    path = tmp_path / "phone.jpg"
    path.write_bytes(_exif_jpeg(48, 32, orientation=6, seed=5))  # stored 48x32, shown 32x48 (rotated 90)
    upright = load_image(str(path))
    assert upright.size == (32, 48)
    pipe = QwenImageEditPipeline.from_pretrained(tiny_checkpoint_cached(EDIT), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        with torch.no_grad():
            generator = torch.Generator("cpu").manual_seed(9)
            expected = pipe(
                image=upright,
                prompt="make it blue",
                num_inference_steps=2,
                generator=generator,
                width=32,
                height=32,
                output_type="np",
            ).images
    finally:
        torch.set_num_threads(previous)
    request = image_service_pb2.EditImageRequest(
        model=EDIT,
        prompt="make it blue",
        images=[path.read_bytes()],
        width=32,
        height=32,
        steps=2,
        seed=9,
        output_format=common_pb2.OUTPUT_FORMAT_NPY,
    )
    response = stack.gateway(EDIT).EditImage(request, timeout=120)
    actual = np.load(io.BytesIO(response.images[0].data), allow_pickle=False)
    assert float(np.abs(actual - expected[0]).max()) <= 1e-5
