"""Ulysses x ring sequence parallelism (issue 13): any --sp, still equal to one process.

The group tests run real torch.distributed groups on the CPU (gloo, fp32) whose other ranks are forked from a
preloaded forkserver (`tests.ring_harness`), so a group of 16 ranks starts in about a second. Each group runs
parity scenarios and compares the images (max |diff| <= 1e-6) and every step's DiT output (cosine >= 0.999999)
with the one-process run of the same session. The matrix covers P in {2, 3, 4, 6, 8}, with and without
--cfg-parallel, on test checkpoints with 6 heads (which P = 4 and 8 do not divide: 2 x 2 and 2 x 4) and with 4
heads, odd token counts (63 Qwen tokens) and captions of different lengths (CFG with a negative prompt of
another length). Every parity scenario runs at least once under a ring; RING_MATRIX=full runs every scenario at
every P, with and without --cfg-parallel (slow: for a GPU-less check before a release).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.compare import cosine
from imagegen.common.attention import sdpa
from imagegen.common.denoise import StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.parallel.launch import free_port
from imagegen.common.parallel.layout import LayoutError, choose_layout, valid_layouts
from imagegen.common.parallel.ring import merge_partials, partial_attention
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import LAYOUT_CASES, THREADS, Case, Run, max_diff, run_job
from tests.ring_harness import forked_group

IMAGE_TOLERANCE = 1e-6
MIN_COSINE = 0.999999
# Sizes with odd token counts where the family allows it (Qwen 112x144: 63 tokens): 8 rows a rank at P = 8 (the plan
# pads a rank's sequence to MIN_LOCAL_ROWS, so few rows round as one process's do).
CASES = LAYOUT_CASES


# (heads, P, --ulysses or None, --cfg-parallel, scenarios): one group each. Layouts in the ids (U x R).
LEAN = [
    (6, 4, None, True, ["qwen-image-cfg", "qwen-image-no-negative", "qwen-image-non-square"]),  # 2x2, x2 CFG
    (6, 8, None, False, ["qwen-image-non-square", "z-image-cfg-norm-truncation"]),  # 2x4
    (4, 4, 2, False, ["qwen-image-edit-plus-two-images"]),  # 2x2 by --ulysses 2 (4 x 1 by default)
    (4, 3, None, True, ["qwen-image-cfg", "z-image-cfg-norm-truncation"]),  # 1x3, x2 CFG
    (4, 6, None, False, ["qwen-image-edit-cfg", "z-image-turbo"]),  # 2x3
    (4, 2, 1, True, ["qwen-image-edit-2511-zero-cond-t", "qwen-image-non-square"]),  # 1x2, x2 CFG
]
FULL = [(h, p, None, c, list(CASES)) for h in (4, 6) for p in (2, 3, 4, 6, 8) for c in (False, True)]
MATRIX = FULL if os.environ.get("RING_MATRIX") == "full" else LEAN


def checkpoint(case: Case, heads: int):
    return tiny_checkpoint_cached(case.family, case.variant, heads=heads)


pytestmark = pytest.mark.usefixtures("parity_threads")


_single: dict[tuple, tuple[Pipeline, object, Run]] = {}


def encoded(case: Case, heads: int):
    """The one-process pipeline, the encoded job and its run, once per (case, heads)."""
    key = (case.name, case.options.width, case.options.height, heads)
    if key not in _single:
        pipeline = Pipeline(checkpoint(case, heads))
        images = case.images()
        job = pipeline.job(pipeline.resolve(case.options, images), images)
        _single[key] = (pipeline, job, run_job(pipeline, job))
    return _single[key]


def differences(parallel: Run, single: Run) -> tuple[float, float]:
    """(image max |diff|, worst step-output cosine) of a group run against the one-process run."""
    assert sorted(parallel.outputs) == sorted(single.outputs)
    worst = min(cosine(parallel.outputs[k], single.outputs[k]) for k in single.outputs)
    return max_diff(parallel.images, single.images), worst


def run_in_group(heads: int, sp: int, ulysses, cfg: bool, names: list[str], **group_options) -> dict[str, tuple]:
    """Each scenario's (image diff, cosine) in one group per checkpoint (a group serves one model)."""
    results = {}
    by_checkpoint: dict[object, list[Case]] = {}
    for name in names:
        case = CASES[name]
        by_checkpoint.setdefault(checkpoint(case, heads), []).append(case)
    for path, cases in by_checkpoint.items():
        for case in cases:
            encoded(case, heads)  # one-process runs first: the group's ranks share the two cores
        with forked_group(path, sp, cfg, ulysses, THREADS, **group_options) as group:
            layout = group.group.layout
            for case in cases:
                pipeline, job, single = encoded(case, heads)
                results[case.name] = (*differences(run_job(pipeline, job, group), single), layout)
    return results


def _matrix_id(entry) -> str:
    heads, sp, ulysses, cfg, names = entry
    layout = choose_layout(sp, heads, ulysses)
    return f"h{heads}-sp{sp}-{layout.ulysses}x{layout.ring}{'-cfg2' if cfg else ''}"


@pytest.mark.parametrize("entry", MATRIX, ids=_matrix_id)
def test_ulysses_ring_equals_single_process(entry) -> None:
    heads, sp, ulysses, cfg, names = entry
    results = run_in_group(heads, sp, ulysses, cfg, names)
    print({name: f"image {d:.3g} cosine {c:.9f} {layout}" for name, (d, c, layout) in results.items()})
    for name, (image_diff, worst_cosine, layout) in results.items():
        assert layout == choose_layout(sp, heads, ulysses), f"{name}: the checkpoint has other heads than {heads}"
        assert image_diff <= IMAGE_TOLERANCE, f"{name} at {layout}: image max |diff| {image_diff:.3g}"
        assert worst_cosine >= MIN_COSINE, f"{name} at {layout}: step output cosine {worst_cosine:.9f}"


def test_log_sum_exp_merge_matches_to_float_rounding() -> None:
    """The streaming merge (--ring-merge lse) differs from one process only by fp32 rounding: one process's
    own rounding moves these tiny models' images by ~1e-6 from an exact float64 attention, so the bound is 1e-5."""
    results = run_in_group(6, 4, None, False, ["qwen-image-cfg"], ring_merge="lse")
    image_diff, worst_cosine, _ = results["qwen-image-cfg"]
    print(f"lse merge: image {image_diff:.3g} cosine {worst_cosine:.9f}")
    assert 0 < image_diff <= 1e-5  # not 0: the merge really ran (the ordered one gives one process's bits)
    assert worst_cosine >= MIN_COSINE


def test_text_through_the_ring_breaks_parity() -> None:
    """The trap: Qwen's replicated text stacked onto every key/value block (attended R times) must fail."""
    results = run_in_group(6, 4, None, False, ["qwen-image-cfg"], patch="text-through-ring")
    image_diff, worst_cosine, _ = results["qwen-image-cfg"]
    assert image_diff > 100 * IMAGE_TOLERANCE
    assert worst_cosine < MIN_COSINE


def test_torchrun_cli_ring_with_cfg_parallel_equals_one_process(tmp_path) -> None:
    """`torchrun --nproc-per-node=4 -m imagegen.cli generate --sp 2 --ulysses 1 --cfg-parallel`: a ring of two
    per CFG branch, started the way the Helm chart starts groups, writes the one-process image."""
    case = CASES["qwen-image-non-square"]
    o = case.options
    model = checkpoint(case, 4)
    out = tmp_path / "ring.npy"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4"]
    command += [f"--master-port={free_port()}", "-m", "imagegen.cli", "generate", "--model", str(model)]
    command += ["--prompt", o.prompt, "--negative-prompt", o.negative_prompt, "--guidance-scale", str(o.guidance_scale)]
    command += ["--steps", str(o.steps), "--width", str(o.width), "--height", str(o.height), "--seed", str(o.seed)]
    command += ["--sp", "2", "--ulysses", "1", "--cfg-parallel", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = Pipeline(model)(o, (), StepHooks())
    assert max_diff(np.load(out), single) <= IMAGE_TOLERANCE


# --- layouts and request checks (no group) --------------------------------------------------------------------------
def test_largest_ulysses_degree_that_divides_the_heads() -> None:
    assert [str(choose_layout(p, 30)) for p in (1, 2, 4, 6, 8)] == [
        "1x1 (ulysses x ring)",
        "2x1 (ulysses x ring)",
        "2x2 (ulysses x ring)",
        "6x1 (ulysses x ring)",
        "2x4 (ulysses x ring)",
    ]
    assert choose_layout(8, 24).ulysses == 8
    assert choose_layout(8, 30, ulysses=1).ring == 8
    assert [layout.ulysses for layout in valid_layouts(12, 30)] == [6, 3, 2, 1]


def test_impossible_ulysses_degree_names_the_valid_layouts() -> None:
    with pytest.raises(
        LayoutError,
        match=r"--ulysses 4 does not fit --sp 8 .* 30 attention heads.*"
        r"valid for --sp 8: --ulysses 2, --ulysses 1",
    ):
        choose_layout(8, 30, ulysses=4)
    with pytest.raises(LayoutError, match="at least 1"):
        choose_layout(0, 30)


def test_fewer_image_tokens_than_ranks_is_refused_with_the_fix() -> None:
    from imagegen.common.parallel.layout import check_request_fits

    check_request_fits(32, 64, 8)  # 2 x 4 tokens: one per rank
    with pytest.raises(InvalidArgument, match=r"16x32 image has 2 image token.*8 sequence-parallel.*--sp 2"):
        check_request_fits(16, 32, 8)


def test_merge_of_key_blocks_is_attention_over_all_keys_in_a_fixed_order() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=gen) for _ in range(3))
    bounds = [0, 5, 6, 20, 37]
    partials = [partial_attention(q, k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)]
    merged = merge_partials(partials)
    assert max_diff(merged, sdpa(q, k, v)) <= 1e-6
    assert torch.equal(merge_partials(partials), merged)  # the same list, the same bits
