"""Our in-process runtime against the official diffusers 0.42.1 pipelines, on tiny random-weight checkpoints.

Both run in this test session with the same seed; final images and every step's DiT output must agree to
max |diff| <= 1e-5 (float32, CPU, pinned threads). The trap tests then break one known accuracy rule at a time
and show that the same check fails, so the tiny checkpoints are sensitive enough to catch those bugs.
"""

from __future__ import annotations

import pytest
import torch

from imagegen.common.families import qwen_image, z_image
from imagegen.common.families.qwen_image import pipeline as qwen_pipeline
from imagegen.common.families.z_image import dit as z_dit
from imagegen.common.pipeline import Pipeline
from imagegen.common.rope import Rotary
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import CASES, TOLERANCE, Case, assert_parity, compare_runs, reference_run, run_ours

pytestmark = pytest.mark.usefixtures("parity_threads")


def checkpoint(case: Case):
    return tiny_checkpoint_cached(case.family, case.variant)


def reference(name: str):
    """The diffusers run of a case, computed once per session (the trap and fast-path tests reuse it)."""
    return reference_run(name)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name: str) -> None:
    case = CASES[name]
    ours = run_ours(checkpoint(case), case)
    ref = reference(name)
    assert ours.images.shape == (case.options.num_images, case.options.height, case.options.width, 3)
    assert_parity(ours, ref)


def test_z_image_case_exercises_truncation_and_normalization() -> None:
    """The Z-Image case is only a check of cfg_truncation/cfg_normalization if both change its result."""
    case = CASES["z-image-cfg-norm-truncation"]
    pipeline = Pipeline(checkpoint(case))
    base = run_ours(checkpoint(case), case, pipeline)
    steps_with_negative = [step for step, branch in base.outputs if branch == "negative"]
    assert 0 < len(steps_with_negative) < case.options.steps, "truncation should drop CFG on some steps only"
    without_norm = run_ours(checkpoint(case), case.with_options(cfg_normalization=0.0), pipeline)
    without_truncation = run_ours(checkpoint(case), case.with_options(cfg_truncation=1.0), pipeline)
    assert compare_runs(without_norm, base)["image"] > 1e-3
    assert abs(without_truncation.images - base.images).max() > 1e-3


# --------------------------------------------------------------------------------------------------------- traps
def assert_parity_breaks(ours, ref) -> float:
    worst = max(compare_runs(ours, ref).values())
    print(f"broken runtime: max |diff| {worst:.3g}")
    assert worst > 100 * TOLERANCE, f"the broken runtime still matches diffusers (max |diff| {worst:.3g})"
    return worst


def test_trap_cfg_without_norm_rescale(monkeypatch) -> None:
    monkeypatch.setattr(qwen_pipeline, "qwen_true_cfg", lambda pos, neg, scale: neg + scale * (pos - neg))
    case = CASES["qwen-image-cfg"]
    assert_parity_breaks(run_ours(checkpoint(case), case), reference(case.name))


def test_trap_edit_negative_branch_without_image() -> None:
    """The negative prompt encoded from text alone, as a server that drops the image from that branch does."""
    case = CASES["qwen-image-edit-cfg"]
    pipeline = Pipeline(checkpoint(case))
    encoder = pipeline.text_encoder
    original_encode = encoder.encode

    def encode(prompt: str, images, max_sequence_length: int) -> torch.Tensor:
        if prompt != case.options.negative_prompt:
            return original_encode(prompt, images, max_sequence_length)
        text = qwen_image.template(encoder.variant.system, prompt)
        tokens = encoder.tokenizer.tokenizer([text], return_tensors="pt")
        hidden = encoder.model.model(**tokens, output_hidden_states=True).hidden_states[-1][0]
        return hidden[encoder.variant.drop_tokens :]

    encoder.encode = encode
    assert_parity_breaks(run_ours(checkpoint(case), case, pipeline), reference(case.name))


def test_trap_rope_in_bf16(monkeypatch) -> None:
    def bf16_tables(freqs: torch.Tensor) -> Rotary:
        return Rotary(torch.complex(freqs.real.bfloat16().float(), freqs.imag.bfloat16().float()))

    monkeypatch.setattr(Rotary, "from_complex", staticmethod(bf16_tables))
    case = CASES["qwen-image-cfg"]
    assert_parity_breaks(run_ours(checkpoint(case), case), reference(case.name))


def test_trap_negative_rope_from_positive_caption_length(monkeypatch) -> None:
    case = CASES["z-image-cfg-norm-truncation"]
    pipeline = Pipeline(checkpoint(case))
    positive = pipeline.text_encoder.encode(case.options.prompt, [], 512)
    positive_padded = z_image.padded_length(positive.shape[0])
    negative = pipeline.text_encoder.encode(case.options.negative_prompt, [], 512)
    assert z_image.padded_length(negative.shape[0]) != positive_padded, "the case needs captions of other lengths"
    original = z_dit.image_ids
    monkeypatch.setattr(z_dit, "image_ids", lambda rows, cols, _padded: original(rows, cols, positive_padded))
    assert_parity_breaks(run_ours(checkpoint(case), case, pipeline), reference(case.name))
