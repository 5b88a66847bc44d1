"""Per-model request defaults (`<model>/imagegen.json`, the --default-* flags) through the services: a `serve
all` of the tiny Z-Image-Turbo checkpoint (whose folder says 8 steps at guidance 0, as `make-tiny --variant
turbo` writes it) answers a request that names neither exactly as one that asks for 8 steps at guidance 0, over
gRPC and HTTP, and shows the defaults in ListModels and /v1/models; a bad defaults file stops start-up naming
its key."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import requests
from imagegen_client.sdk import ImageClient

from imagegen.cli import build_parser
from imagegen.common.model_defaults import DEFAULTS_FILE, ModelDefaultsError, read_model_defaults
from imagegen.common.options import ModelDefaults
from imagegen.common.serving.hosting import HostedModel
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.services.denoiser_config import DenoiserConfig
from tests.service_harness import Service, free_port, stop_all

REQUEST = dict(width=64, height=48, seed=11)


@pytest.fixture(scope="module")
def turbo():
    return tiny_checkpoint_cached("z-image", "turbo")


@pytest.fixture(scope="module")
def server(turbo, tmp_path_factory):
    logs = tmp_path_factory.mktemp("model-defaults-logs")
    ports = [f"--{stage}=127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")]
    service = Service("all-turbo", "all", ["--model", str(turbo), "--model-id", "turbo", *ports], logs)
    try:
        service.wait_serving(timeout=180)
        yield service
    finally:
        stop_all([service])


def test_the_tiny_turbo_checkpoint_carries_its_defaults(turbo):
    assert json.loads((turbo / DEFAULTS_FILE).read_text()) == {"guidance_scale": 0.0, "steps": 8}
    assert read_model_defaults(turbo) == ModelDefaults(steps=8, guidance_scale=0.0)


def test_a_request_naming_no_steps_or_guidance_gets_the_models_defaults(server):
    with ImageClient(server.address) as client:
        unset = client.generate("a lighthouse", output_format="npy", **REQUEST).array
        explicit = client.generate("a lighthouse", output_format="npy", steps=8, guidance_scale=0.0, **REQUEST).array
        diffusers_defaults = client.generate(
            "a lighthouse", output_format="npy", steps=50, guidance_scale=5.0, **REQUEST
        ).array
        png = np.asarray(client.generate("a lighthouse", steps=8, guidance_scale=0.0, **REQUEST).images[0])
    assert np.array_equal(unset, explicit)
    assert not np.array_equal(unset, diffusers_defaults)
    # The same through the HTTP API, which leaves both unset too.
    body = {"prompt": "a lighthouse", "size": "64x48", "seed": 11}
    reply = requests.post(f"http://127.0.0.1:{server.http_port}/v1/images/generations", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    served = PIL.Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(served), png)


def test_list_models_and_v1_models_show_the_defaults(server):
    with ImageClient(server.address) as client:
        (summary,) = client.list_models().models
    assert (summary.model_id, summary.default_steps, summary.default_guidance_scale) == ("turbo", 8, 0.0)
    assert (summary.default_width, summary.default_height) == (1024, 1024)  # the family's: the file sets none
    assert summary.default_negative_prompt == ""  # Z-Image's own default negative prompt
    listed = requests.get(f"http://127.0.0.1:{server.http_port}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["default_steps"], m["default_guidance_scale"]) for m in listed] == [("turbo", 8, 0.0)]
    assert (listed[0]["default_width"], listed[0]["default_height"]) == (1024, 1024)


def test_flags_override_the_file(turbo):
    argv = ["serve", "denoiser", "--model", str(turbo), "--default-steps", "3", "--default-width", "256"]
    args = build_parser().parse_args([*argv, "--default-height", "128", "--default-negative-prompt", "dull"])
    config = DenoiserConfig.from_flags(args, HostedModel.from_args(args))
    assert config.model_defaults == ModelDefaults(
        steps=3, guidance_scale=0.0, width=256, height=128, negative_prompt="dull"
    )


def test_defaults_are_judged_against_the_limits_only_where_the_deployment_set_them(turbo):
    """A small --max-side or --max-steps refuses a default above it, not the family's own 1024^2 / 50 steps."""
    argv = ["serve", "denoiser", "--model", str(turbo), "--max-side", "64", "--max-steps", "4"]
    args = build_parser().parse_args(argv)
    hosted = HostedModel.from_args(args)
    with pytest.raises(ModelDefaultsError, match="steps must be between 1 and 4, got 8"):
        DenoiserConfig.from_flags(args, hosted)
    args = build_parser().parse_args([*argv, "--default-steps", "4"])
    assert DenoiserConfig.from_flags(args, hosted).model_defaults.steps == 4
    sized = ["--default-steps", "4", "--default-width", "128", "--default-height", "64"]
    args = build_parser().parse_args([*argv, *sized])
    with pytest.raises(ModelDefaultsError, match="width must be between 16 and 64, got 128"):
        DenoiserConfig.from_flags(args, hosted)


def _folder_with(turbo, tmp_path, defaults_text: str):
    """The tiny Turbo folder (its components linked, not copied) with another imagegen.json."""
    folder = tmp_path / "turbo"
    folder.mkdir()
    for entry in turbo.iterdir():
        if entry.name != DEFAULTS_FILE:
            (folder / entry.name).symlink_to(entry)
    (folder / DEFAULTS_FILE).write_text(defaults_text)
    return folder


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"stepz": 8}', "'stepz'"),
        ('{"steps": "8"}', "steps must be an integer"),
        ('{"steps": 100000}', "steps"),
        ('{"guidance_scale": -1}', "guidance_scale"),
        ('{"width": 512}', "width and height"),
        ('{"width": 500, "height": 512}', "width"),
        ("[8]", "JSON object"),
    ],
    ids=["unknown-key", "string-steps", "steps-over-limit", "negative-guidance", "width-alone", "odd-width", "list"],
)
def test_a_bad_defaults_file_stops_start_up_naming_the_key(turbo, tmp_path, text, named):
    folder = _folder_with(turbo, tmp_path, text)
    argv = [sys.executable, "-m", "imagegen.cli", "serve", "denoiser", "--model", str(folder), "--port", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("imagegen: error:")]
    assert named in line and DEFAULTS_FILE in line, line
