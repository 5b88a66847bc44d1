"""Run a diffusers 0.42.1 pipeline and our runtime on the same tiny checkpoint, capturing every DiT output.

Shared by the parity tests of the in-process runtime, the sequence-parallel runtime and the services.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline

THREADS = 2  # CPU results move by ~1e-6 with the thread count: every comparison pins it
# Parallel-layout parity runs the scenarios at sizes with odd token counts (112x144: 63 Qwen tokens) where every
# rank of P = 4 holds real rows of every segment; smaller images are tested on their own
# (test_parallel.test_few_rows_per_rank_equal_one_process: a rank's sequence is padded to MIN_LOCAL_ROWS).
LAYOUT_SIZES = {
    "qwen-image-cfg": (128, 128),
    "qwen-image-no-negative": (128, 128),
    "qwen-image-non-square": (112, 144),
    "qwen-image-edit-cfg": (128, 128),
    "qwen-image-edit-plus-two-images": (112, 144),
    "qwen-image-edit-2511-zero-cond-t": (112, 144),
    "z-image-cfg-norm-truncation": (112, 144),
    "z-image-turbo": (144, 112),
}
TOLERANCE = 1e-5

# Long enough that its padded Z-Image caption is longer than the positive one by more than 32 tokens.
LONG_NEGATIVE = (
    "blurry, low quality, jpeg artifacts, oversaturated, washed out colors, bad anatomy, extra limbs, watermark, "
    "signature, text, cropped, out of frame, duplicate, deformed, ugly, noisy, grainy, overexposed, underexposed, "
    "distorted perspective, tiling, poorly drawn hands, poorly drawn face, mutation, disfigured, cartoonish"
)


@dataclass(frozen=True)
class Case:
    """One parity scenario: a tiny checkpoint, request options and the sizes of random input images."""

    name: str
    family: str
    options: RequestOptions
    variant: str | None = None
    image_sizes: tuple[tuple[int, int], ...] = ()

    def images(self) -> list[PIL.Image.Image]:
        rng = np.random.default_rng(7)
        return [
            PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in self.image_sizes
        ]

    def with_options(self, **changes) -> Case:
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))


PROMPT = "a red fox jumping over a frozen river at dawn"

# The scenarios of the acceptance list; the parallel tests rerun them at larger sizes.
CASES = {
    case.name: case
    for case in [
        Case(
            "qwen-image-cfg",
            "qwen-image",
            RequestOptions(PROMPT, negative_prompt="blurry", guidance_scale=4.0, steps=3, width=64, height=64, seed=11),
        ),
        Case(
            "qwen-image-no-negative",
            "qwen-image",
            RequestOptions(PROMPT, steps=3, width=64, height=64, seed=12, num_images=2),
        ),
        Case(
            "qwen-image-non-square",
            "qwen-image",
            RequestOptions(PROMPT, negative_prompt=" ", guidance_scale=4.0, steps=3, width=48, height=80, seed=13),
        ),
        Case(
            "qwen-image-edit-cfg",
            "qwen-image-edit",
            RequestOptions("make the sky purple", negative_prompt="blurry", steps=2, width=64, height=48, seed=14),
            image_sizes=((56, 40),),
        ),
        Case(
            "qwen-image-edit-plus-two-images",
            "qwen-image-edit-plus",
            RequestOptions("put the cat on the sofa", negative_prompt=" ", steps=2, width=48, height=64, seed=15),
            image_sizes=((56, 40), (40, 72)),
        ),
        Case(
            "qwen-image-edit-2511-zero-cond-t",
            "qwen-image-edit-plus",
            RequestOptions("put the cat on the sofa", negative_prompt=" ", steps=2, width=64, height=48, seed=16),
            variant="2511",
            image_sizes=((56, 40), (40, 72)),
        ),
        Case(
            "z-image-cfg-norm-truncation",
            "z-image",
            RequestOptions(
                "a cat",
                negative_prompt=LONG_NEGATIVE,
                guidance_scale=5.0,
                cfg_normalization=1.0,
                cfg_truncation=0.1,
                steps=4,
                width=64,
                height=48,
                seed=17,
            ),
        ),
        Case(
            "z-image-turbo",
            "z-image",
            RequestOptions(PROMPT, guidance_scale=0.0, steps=4, width=80, height=48, seed=18),
            variant="turbo",
        ),
    ]
}

# The scenarios at LAYOUT_SIZES, as the parallel-layout tests run them.
LAYOUT_CASES = {
    name: case.with_options(width=LAYOUT_SIZES[name][0], height=LAYOUT_SIZES[name][1]) for name, case in CASES.items()
}


@dataclass
class Run:
    """Final images `[K, H, W, 3]` and the DiT outputs by (step, branch), each `[K, ...]`."""

    images: np.ndarray
    outputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def diffusers_kwargs(case: Case, images: list[PIL.Image.Image]) -> dict:
    o = case.options
    kwargs = dict(
        prompt=o.prompt,
        negative_prompt=o.negative_prompt,
        num_inference_steps=o.steps,
        width=o.width,
        height=o.height,
        num_images_per_prompt=o.num_images,
        generator=torch.Generator("cpu").manual_seed(o.seed),
        output_type="np",
    )
    if o.max_sequence_length is not None:
        kwargs["max_sequence_length"] = o.max_sequence_length
    if case.family == "z-image":
        kwargs["guidance_scale"] = 5.0 if o.guidance_scale is None else o.guidance_scale
        if o.cfg_normalization is not None:
            kwargs["cfg_normalization"] = o.cfg_normalization
        if o.cfg_truncation is not None:
            kwargs["cfg_truncation"] = o.cfg_truncation
    elif o.guidance_scale is not None:
        kwargs["true_cfg_scale"] = o.guidance_scale
    if images:
        kwargs["image"] = images if case.family == "qwen-image-edit-plus" else images[0]
    return kwargs


def run_diffusers(path: Path, case: Case) -> Run:
    """The official pipeline loaded from `path`, run on `case`."""
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return run_pipeline(pipe, case)


def run_pipeline(pipe: DiffusionPipeline, case: Case, images: list[PIL.Image.Image] | None = None) -> Run:
    """`pipe` on `case` (its own random images unless given), with a forward hook on the transformer recording
    each branch's raw output while it runs."""
    calls: list = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, out: calls.append(out[0] if isinstance(out, tuple) else out.sample)
    )
    try:
        result = pipe(**diffusers_kwargs(case, case.images() if images is None else images)).images
    finally:
        handle.remove()
    return Run(result, _label_diffusers_calls(case, calls))


def _label_diffusers_calls(case: Case, calls: list) -> dict[tuple[int, str], torch.Tensor]:
    outputs = {}
    if case.family == "z-image":
        # One batched call per step: K positive samples, then K negative ones when CFG runs at that step.
        k = case.options.num_images
        for step, samples in enumerate(calls):
            stacked = torch.stack([s[:, 0] for s in samples])
            outputs[(step, "positive")] = stacked[:k]
            if len(samples) > k:
                outputs[(step, "negative")] = stacked[k:]
        return outputs
    branches = ["positive", "negative"] if case.options.negative_prompt is not None else ["positive"]
    for i, out in enumerate(calls):
        outputs[(i // len(branches), branches[i % len(branches)])] = out
    return outputs


def _recorder() -> tuple[dict[tuple[int, str], torch.Tensor], StepHooks]:
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def record(step: int, branch: str, output: torch.Tensor) -> None:
        outputs[(step, branch)] = output.detach().clone()

    return outputs, StepHooks(on_model_output=record)


def run_ours(path: Path, case: Case, pipeline: Pipeline | None = None) -> Run:
    pipeline = pipeline or Pipeline(path)
    outputs, hooks = _recorder()
    images = pipeline(case.options, case.images(), hooks)
    return Run(images, outputs)


def run_job(pipeline: Pipeline, job: DenoiseJob, denoiser=None) -> Run:
    """Denoise + decode an encoded job, recording the DiT outputs (the encode stages are not rerun)."""
    outputs, hooks = _recorder()
    images = pipeline.run_job(job, hooks, denoiser)
    return Run(images, outputs)


def max_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def compare_runs(ours: Run, reference: Run) -> dict[str, float]:
    """Max |diff| of the images and of every step's DiT output (ours may be the noisy-token slice)."""
    assert sorted(ours.outputs) == sorted(reference.outputs), "different (step, branch) calls"
    diffs = {"image": max_diff(ours.images, reference.images)}
    for key, out in ours.outputs.items():
        ref = reference.outputs[key]
        if ref.dim() == 3:  # Qwen: the reference includes the condition-image tokens
            ref = ref[:, : out.shape[1]]
        diffs[f"step{key[0]}-{key[1]}"] = max_diff(out, ref)
    return diffs


def assert_parity(ours: Run, reference: Run, tolerance: float = TOLERANCE) -> None:
    diffs = compare_runs(ours, reference)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tolerance, f"max |diff| {diffs[worst]:.3g} at {worst} (all: {diffs})"


_references: dict[str, Run] = {}


def reference_run(name: str) -> Run:
    """The diffusers run of `CASES[name]`, computed once per test session (parity, fast-path and trap tests)."""
    if name not in _references:
        from imagegen.common.tiny import tiny_checkpoint_cached

        case = CASES[name]
        _references[name] = run_diffusers(tiny_checkpoint_cached(case.family, case.variant), case)
    return _references[name]
