"""Qwen-Image-2.1 in-process: our Pipeline equals `QwenImage21Pipeline`, run in this session on the same tiny
checkpoint, to <= 1e-5 (images and every step's DiT output) for prompts of two lengths, with and without a
negative prompt / CFG, two sizes (160x64 has 40 target tokens: not divisible by 3), K = 2 images, and the Turbo
grid; trap tests show the comparison fails on a wrong guidance rule, an ignored negative prompt, bf16 RoPE rows and
normalised encoder states; bad requests get the field that is wrong."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from diffusers import QwenImage21Pipeline

from imagegen.common.cfg import qwen_true_cfg
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families.qwen_image_21 import pipeline as qwen21
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline
from imagegen.common.rope import Rotary
from imagegen.common.tiny_qwen_image_21 import TURBO_SIGMAS, build_qwen_image_21
from tests.parity import TOLERANCE, max_diff

pytestmark = pytest.mark.usefixtures("parity_threads")

SHORT = "a red fox"
LONG = "a red fox jumping over a frozen river at dawn, mist rising from the ice, pine trees on the far bank"

CASES = {
    "short-cfg-64x96": RequestOptions(
        SHORT, negative_prompt="blurry", guidance_scale=4.0, width=64, height=96, steps=3, seed=1
    ),
    "long-no-negative-160x64-two-images": RequestOptions(LONG, width=160, height=64, steps=3, seed=2, num_images=2),
    "long-cfg-empty-negative-160x64": RequestOptions(
        LONG, negative_prompt="", guidance_scale=3.0, width=160, height=64, steps=2, seed=3
    ),
    # A negative prompt without guidance (the default scale 1.0): neither side runs the negative branch.
    "short-negative-no-guidance-160x64": RequestOptions(
        SHORT, negative_prompt="blurry", width=160, height=64, steps=2, seed=4
    ),
}


@dataclasses.dataclass
class Run:
    images: torch.Tensor
    outputs: dict[tuple[int, str], torch.Tensor]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return build_qwen_image_21(tmp_path_factory.mktemp("qwen21") / "tiny")


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory) -> pathlib.Path:
    return build_qwen_image_21(tmp_path_factory.mktemp("qwen21") / "turbo", variant="turbo")


@pytest.fixture(scope="module")
def ours(folder) -> Pipeline:
    return Pipeline(folder)


_reference: dict[tuple[str, str], Run] = {}


def run_diffusers(folder: pathlib.Path, options: RequestOptions) -> Run:
    """`QwenImage21Pipeline` on `options`, recording each transformer call's target rows (positive, then
    negative, per step)."""
    pipe = QwenImage21Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    calls: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(out[0]))
    try:
        images = pipe(
            prompt=options.prompt,
            negative_prompt=options.negative_prompt,
            true_cfg_scale=1.0 if options.guidance_scale is None else options.guidance_scale,
            width=options.width,
            height=options.height,
            num_inference_steps=options.steps,
            num_images_per_prompt=options.num_images,
            generator=torch.Generator("cpu").manual_seed(options.seed),
            output_type="np",
        ).images
    finally:
        handle.remove()
    assert options.width is not None and options.height is not None
    tokens = (options.width // 16) * (options.height // 16)
    cfg = options.negative_prompt is not None and (options.guidance_scale or 1.0) > 1
    branches = ["positive", "negative"] if cfg else ["positive"]
    outputs = {(i // len(branches), branches[i % len(branches)]): out[:, -tokens:] for i, out in enumerate(calls)}
    return Run(torch.from_numpy(images), outputs)


def reference(folder: pathlib.Path, name: str) -> Run:
    key = (str(folder), name)
    if key not in _reference:
        _reference[key] = run_diffusers(folder, CASES[name])
    return _reference[key]


def recorder() -> tuple[dict[tuple[int, str], torch.Tensor], StepHooks]:
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    return outputs, StepHooks(on_model_output=lambda s, b, out: outputs.__setitem__((s, b), out.clone()))


def run_ours(pipeline: Pipeline, options: RequestOptions) -> Run:
    outputs, hooks = recorder()
    return Run(torch.from_numpy(pipeline(options, hooks=hooks)), outputs)


def run_job(pipeline: Pipeline, job: DenoiseJob) -> Run:
    outputs, hooks = recorder()
    return Run(torch.from_numpy(pipeline.run_job(job, hooks)), outputs)


def worst_diff(ours: Run, ref: Run) -> float:
    assert sorted(ours.outputs) == sorted(ref.outputs), "different (step, branch) calls"
    diffs = [max_diff(ours.images, ref.images)]
    diffs += [max_diff(out, ref.outputs[key]) for key, out in ours.outputs.items()]
    return max(diffs)


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_equals_diffusers(folder, ours, name) -> None:
    ref = reference(folder, name)
    mine = run_ours(ours, CASES[name])
    options = CASES[name]
    assert mine.images.shape == (options.num_images, options.height, options.width, 4)  # RGBA
    assert ref.images.std() > 0.05  # a real image, not a flat one that any forward would match
    worst = worst_diff(mine, ref)
    assert worst <= TOLERANCE, f"{name}: max |ours - diffusers| = {worst:.3g}"


def test_turbo_grid_replaces_the_step_count(turbo_folder) -> None:
    """The Turbo checkpoint's `sample_sigmas` (3 values) win over `steps`, on both sides."""
    options = dataclasses.replace(CASES["short-cfg-64x96"], steps=7)
    ref = run_diffusers(turbo_folder, options)
    mine = run_ours(Pipeline(turbo_folder), options)
    assert {step for step, _ in mine.outputs} == set(range(len(TURBO_SIGMAS)))
    assert worst_diff(mine, ref) <= TOLERANCE


# ------------------------------------------------------------------------------------------------------- traps
def _bf16(rotary: Rotary | None) -> Rotary | None:
    if rotary is None:
        return None
    real = torch.view_as_real(rotary.freqs).to(torch.bfloat16).float()
    return Rotary(torch.view_as_complex(real.contiguous()))


def _bf16_layout_for(*args, **kwargs):
    layout = qwen21_layout_for(*args, **kwargs)
    return dataclasses.replace(
        layout, target_rotary=_bf16(layout.target_rotary), prefix_rotary=_bf16(layout.prefix_rotary)
    )


qwen21_layout_for = qwen21.layout_for


@pytest.mark.parametrize("trap", ["negative-ignored", "norm-rescale-cfg", "bf16-rope", "normed-encoder-states"])
def test_trap_the_comparison_fails_on_a_wrong_pipeline(folder, ours, monkeypatch, trap) -> None:
    name = "short-cfg-64x96"
    ref = reference(folder, name)
    job = ours.job(ours.resolve(CASES[name]))
    if trap == "negative-ignored":
        job = dataclasses.replace(job, negative_embeds=job.prompt_embeds)
    elif trap == "norm-rescale-cfg":  # Qwen-Image's rule, which 2.1 dropped
        monkeypatch.setattr(qwen21, "true_cfg", qwen_true_cfg)
    elif trap == "bf16-rope":
        monkeypatch.setattr(qwen21, "layout_for", _bf16_layout_for)
    else:  # the encoder's final RMSNorm applied, as transformers 5 returns `hidden_states[-1]` without the hook
        norm = ours.text_encoder.model.model.language_model.norm
        with torch.no_grad():
            job = dataclasses.replace(
                job, prompt_embeds=norm(job.prompt_embeds), negative_embeds=norm(job.negative_embeds)
            )
    worst = worst_diff(run_job(ours, job), ref)
    assert worst > 100 * TOLERANCE, f"{trap}: the pipeline should have moved the output, moved {worst:.3g}"


# ------------------------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 48}, "width"),
        ({"height": 80}, "height"),
        ({"prompt": "a <|image_pad|> fox"}, "prompt"),
        ({"prompt": "<|video_pad|>"}, "prompt"),
    ],
)
def test_bad_requests_name_their_field(ours, changes, field) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ours(dataclasses.replace(CASES["short-cfg-64x96"], **changes))
    assert caught.value.field == field


def test_images_are_refused(ours) -> None:
    import PIL.Image

    with pytest.raises(InvalidArgument) as caught:
        ours(CASES["short-cfg-64x96"], [PIL.Image.new("RGB", (64, 64))])
    assert caught.value.field == "images"


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_make_tiny_and_generate_rgba(tmp_path, capsys) -> None:
    import numpy as np
    import PIL.Image

    from imagegen.cli import main

    assert main(["make-tiny", "--family", "qwen-image-2.1", "--variant", "turbo", "--out", str(tmp_path / "t")]) == 0
    folder = tmp_path / "t"
    assert (folder / "model_index.json").is_file()
    common = ["generate", "--model", str(folder), "--prompt", SHORT, "--width", "64", "--height", "32", "--seed", "3"]
    assert main([*common, "--output", str(tmp_path / "out.png")]) == 0
    with PIL.Image.open(tmp_path / "out.png") as image:
        assert (image.mode, image.size) == ("RGBA", (64, 32))
    assert main([*common, "--output", str(tmp_path / "out.npy")]) == 0
    expected = Pipeline(folder)(RequestOptions(SHORT, width=64, height=32, seed=3))
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected)  # the Turbo grid, the same bytes
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "out.jpg")]) == 2  # JPEG has no alpha: one line, no traceback
    assert "JPEG has no alpha" in capsys.readouterr().err
