"""Qwen-Image-2.1 over a denoiser group (gloo, CPU): `--sp 2/3/4`, each with and without `--cfg-parallel`, gives the
one-process image to max |diff| <= 1e-6 and every step's DiT output to cosine >= 0.999999.

Only the target tokens are sharded; the prompt prefix is replicated, computed whole on every rank and attended
once. 160x64 is 40 target tokens (not divisible by 3: the last rank of 3 holds padding rows); every rank's local
sequence is padded to `MIN_LOCAL_ROWS`, so the cached steps (target rows only) take one process's GEMM kernels.
With 4 heads, `--sp 3` is a ring of 3 and `--sp 2` / `--sp 4` are Ulysses."""

from __future__ import annotations

import pathlib

import pytest

from bench.compare import cosine
from imagegen.common.options import RequestOptions
from imagegen.common.parallel.launch import local_group
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny_qwen_image_21 import build_qwen_image_21
from tests.parity import THREADS, max_diff, run_job

pytestmark = pytest.mark.usefixtures("parity_threads")

IMAGE_TOLERANCE = 1e-6
MIN_COSINE = 0.999999
CASES = {
    "cfg-160x64": RequestOptions(
        "a red fox jumping over a frozen river at dawn", negative_prompt="blurry", guidance_scale=4.0,
        width=160, height=64, steps=3, seed=21,
    ),
    "no-cfg-64x96-two-images": RequestOptions("a blue owl", width=64, height=96, steps=3, seed=22, num_images=2),
}  # fmt: skip
MODES = {f"sp{sp}{'-cfg2' if cfg else ''}": (sp, cfg) for sp in (2, 3, 4) for cfg in (False, True)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return build_qwen_image_21(tmp_path_factory.mktemp("qwen21") / "tiny")


@pytest.fixture(scope="module")
def single(folder):
    """The one-process pipeline, each case's encoded job and its run."""
    pipeline = Pipeline(folder)
    jobs = {name: pipeline.job(pipeline.resolve(options)) for name, options in CASES.items()}
    return pipeline, jobs, {name: run_job(pipeline, job) for name, job in jobs.items()}


@pytest.mark.parametrize("mode", list(MODES))
def test_group_equals_one_process(folder, single, mode) -> None:
    sp, cfg_parallel = MODES[mode]
    pipeline, jobs, runs = single
    with local_group(GroupSpec(folder, sp, cfg_parallel, threads=THREADS, timeout_s=120)) as group:
        for name, job in jobs.items():
            parallel, expected = run_job(pipeline, job, group), runs[name]
            assert sorted(parallel.outputs) == sorted(expected.outputs)
            diff = max_diff(parallel.images, expected.images)
            assert diff <= IMAGE_TOLERANCE, f"{mode} {name}: image max |diff| {diff:.3g}"
            worst = min((cosine(parallel.outputs[k], expected.outputs[k]), k) for k in expected.outputs)
            assert worst[0] >= MIN_COSINE, f"{mode} {name}: step output cosine {worst[0]:.9f} at {worst[1]}"


def test_trap_a_prefix_attended_once_per_rank_breaks_parity(folder, single, monkeypatch) -> None:
    """The comparison catches a replicated prefix sent through the all-to-all like the sharded target (every rank's
    copy attended: P copies of each prefix key). Patched here on rank 0's side only, so a 2-rank group's rank 0
    computes its target rows against a doubled prefix."""
    import torch

    from imagegen.common.families.qwen_image_21 import dit

    original = dit.attend_prefixed

    def doubled(backend, sharded, prefix_k, prefix_v):
        return original(backend, sharded, torch.cat([prefix_k, prefix_k], 1), torch.cat([prefix_v, prefix_v], 1))

    monkeypatch.setattr(dit, "attend_prefixed", doubled)
    pipeline, jobs, runs = single
    with local_group(GroupSpec(folder, 2, threads=THREADS, timeout_s=120)) as group:
        parallel = run_job(pipeline, jobs["cfg-160x64"], group)
    assert max_diff(parallel.images, runs["cfg-160x64"].images) > 100 * IMAGE_TOLERANCE
