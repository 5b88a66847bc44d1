"""The `imagegen` command line: outputs in every format, defaults documented, bad input as one clean line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import THREADS, max_diff


def imagegen(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_npy_equals_diffusers(tmp_path) -> None:
    model = tiny_checkpoint_cached("z-image", "turbo")
    out = tmp_path / "z.npy"
    args = ["--model", str(model), "--prompt", "a lighthouse", "--width", "48", "--height", "32"]
    result = imagegen("generate", *args, "--steps", "3", "--guidance-scale", "0", "--seed", "5", "--output", str(out))
    assert result.returncode == 0, result.stderr
    ours = np.load(out)
    torch.set_num_threads(THREADS)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt="a lighthouse",
        width=48,
        height=32,
        num_inference_steps=3,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images
    assert ours.dtype == np.float32 and ours.shape == (1, 32, 48, 3)
    assert max_diff(ours, reference) <= 1e-5


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_image_outputs_are_numbered(tmp_path, suffix: str) -> None:
    out = tmp_path / f"img-{{i}}.{suffix}"
    args = ["--family", "qwen-image", "--prompt", "x", "--width", "32", "--height", "48", "--steps", "2"]
    result = imagegen("generate", *args, "--num-images", "2", "--seed", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    for i in range(2):
        with PIL.Image.open(tmp_path / f"img-{i}.{suffix}") as image:
            assert image.size == (32, 48)
    assert "seed 1" in result.stderr


def test_edit_writes_image(tmp_path) -> None:
    source = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "edited.png"
    args = ["--family", "qwen-image-edit", "--image", str(source), "--prompt", "make it blue"]
    result = imagegen("edit", *args, "--width", "64", "--height", "48", "--steps", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr
    with PIL.Image.open(out) as image:
        assert image.size == (64, 48)


def test_help_states_the_defaults() -> None:
    result = imagegen("generate", "--help")
    assert result.returncode == 0
    for fact in ("steps 50", "guidance (true_cfg_scale) 4.0", "guidance 5.0", "1024x1024", "cfg truncation 1.0"):
        assert fact in result.stdout


def test_make_tiny(tmp_path) -> None:
    result = imagegen("make-tiny", "--family", "z-image", "--out", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()


def _bad_image(tmp_path) -> str:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    return str(path)


BAD_INPUTS = {
    "width-not-multiple": (["generate", "--width", "65"], "width: must be a multiple of 16"),
    "height-too-large": (["generate", "--height", "8192"], "height: must be between 16 and 4096"),
    "width-too-small": (["generate", "--width", "0"], "width: must be between 16 and 4096"),
    "steps-zero": (["generate", "--steps", "0"], "steps: must be between"),
    "qwen-one-step": (["generate", "--steps", "1"], "steps: must be between 2"),
    "negative-guidance": (["generate", "--guidance-scale", "-1"], "guidance_scale: must be between"),
    "cfg-option-on-qwen": (["generate", "--cfg-truncation", "0.5"], "cfg_truncation: applies to z-image only"),
    "missing-model": (["generate", "--model", "/no/such/model"], "model folder not found"),
    "bad-dtype": (["generate", "--dtype", "float16"], "unsupported dtype 'float16'"),
    "bad-output-suffix": (["generate", "--output", "x.gif"], "output: unsupported suffix '.gif'"),
    "missing-image": (["edit", "--image", "/no/such.png"], "image: no such file"),
    "unreadable-image": (["edit", "--image", "{bad_image}"], "image: not a readable image"),
    "edit-two-images": (["edit", "--image", "{good_image}", "--image", "{good_image}"], "images: qwen-image-edit"),
    "ulysses-not-dividing-heads": (
        ["generate", "--sp", "6", "--ulysses", "3"],
        "--ulysses 3 does not fit --sp 6 on a model with 4 attention heads (U must divide both); "
        "valid for --sp 6: --ulysses 2, --ulysses 1",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(tmp_path, name: str) -> None:
    args, message = BAD_INPUTS[name]
    good = tmp_path / "good.png"
    PIL.Image.new("RGB", (40, 40)).save(good)
    args = [a.replace("{bad_image}", _bad_image(tmp_path)).replace("{good_image}", str(good)) for a in args]
    command = [args[0], "--prompt", "x", *args[1:]]
    if "--output" not in command:
        command += ["--output", str(tmp_path / "out.png")]
    result = imagegen(*command)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("imagegen: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
