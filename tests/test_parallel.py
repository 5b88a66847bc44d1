"""Sequence-parallel (Ulysses) and CFG-parallel denoising equal the one-process run.

Each mode starts a real torch.distributed group on the CPU (gloo): this test process is rank 0 and the other
ranks are worker processes. For every family and mode of the parity suite, the final image must equal the
one-process image to max |diff| <= 1e-6 and every step's DiT output must have cosine >= 0.999999 to the
one-process one. Sizes are chosen so that token counts divide by neither 2 nor 4 where the family allows it
(Qwen 112x144: 63 tokens). Images so small that a rank holds only a few rows run too: CPU GEMM kernels sum in
another order for a few rows, so the plan pads a rank's sequence to `MIN_LOCAL_ROWS`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bench.compare import cosine
from imagegen.common.attention import sdpa
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.denoise import DenoiseJob
from imagegen.common.families import get_family
from imagegen.common.parallel import ulysses
from imagegen.common.parallel.group import ParallelGroup
from imagegen.common.parallel.launch import free_port, local_group
from imagegen.common.parallel.layout import LayoutError
from imagegen.common.parallel.runner import GroupDenoiser, follow_leader
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.pipeline import Pipeline
from imagegen.common.stage_settings import StageSettings
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import CASES as PARITY_CASES
from tests.parity import LAYOUT_CASES, THREADS, Case, Run, max_diff, run_job, run_ours

IMAGE_TOLERANCE = 1e-6
MIN_COSINE = 0.999999
MODES = {"sp2": (2, False), "sp4": (4, False), "cfg2": (1, True), "sp2-cfg2": (2, True)}
CASES = list(LAYOUT_CASES.values())  # 112x144 is 63 Qwen tokens
CHECKPOINTS = sorted({(c.family, c.variant) for c in CASES}, key=str)


pytestmark = pytest.mark.usefixtures("parity_threads")


_single: dict[tuple, tuple] = {}


def encoded(case: Case) -> tuple[Pipeline, DenoiseJob, Run]:
    """The one-process pipeline, the encoded job and its run, once per case (encoding edit images is slow)."""
    key = (case.name, case.options.width, case.options.height)
    if key not in _single:
        pipeline = Pipeline(tiny_checkpoint_cached(case.family, case.variant))
        images = case.images()
        job = pipeline.job(pipeline.resolve(case.options, images), images)
        _single[key] = (pipeline, job, run_job(pipeline, job))
    return _single[key]


def single_process(case: Case) -> Run:
    return encoded(case)[2]


def assert_matches_single_process(case: Case, parallel) -> None:
    single = single_process(case)
    assert sorted(parallel.outputs) == sorted(single.outputs)
    image_diff = max_diff(parallel.images, single.images)
    assert image_diff <= IMAGE_TOLERANCE, f"{case.name}: image max |diff| {image_diff:.3g}"
    worst = min((cosine(parallel.outputs[k], single.outputs[k]), k) for k in single.outputs)
    assert worst[0] >= MIN_COSINE, f"{case.name}: step output cosine {worst[0]:.9f} at {worst[1]}"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("checkpoint", CHECKPOINTS, ids=lambda c: c[0] + (f"-{c[1]}" if c[1] else ""))
def test_parallel_equals_single_process(checkpoint, mode: str) -> None:
    family, variant = checkpoint
    sp, cfg_parallel = MODES[mode]
    path = tiny_checkpoint_cached(family, variant)
    cases = [c for c in CASES if (c.family, c.variant) == checkpoint]
    with local_group(GroupSpec(path, sp, cfg_parallel, threads=THREADS, timeout_s=120)) as group:
        for case in cases:
            pipeline, job, _ = encoded(case)
            assert_matches_single_process(case, run_job(pipeline, job, group))


def caption_in_all_to_all(self, sharded, replicated, replicated_first):
    """The upstream bug: Z-Image's replicated caption sent through the all-to-all as if it were sharded, so
    every rank's copy is attended once per rank."""
    if sharded is None or replicated is None:
        return _correct_joint(self, sharded, replicated, replicated_first)
    rows, world = sharded.q.shape[1], self.plan.world
    q, k, v = (
        ulysses.scatter_heads(torch.cat([getattr(sharded, n), getattr(replicated, n)], 1), world, self.group)
        for n in "qkv"
    )
    out = ulysses.gather_heads(sdpa(q, k, v), world, self.group)
    return out[:, :rows], out[:, rows:]


_correct_joint = ulysses.UlyssesAttention.joint


def _broken_rank(rank: int, world: int, port: int, case: Case, out: str) -> None:
    """One rank of a group whose every process runs the buggy attention (spawned by the test below)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(THREADS)
    ulysses.UlyssesAttention.joint = caption_in_all_to_all
    path = tiny_checkpoint_cached(case.family, case.variant)
    group = ParallelGroup.from_environment(world, False, "cpu")
    folder = open_model_folder(path)
    denoiser = get_family(folder.family).denoiser(folder, torch.float32, "cpu")
    try:
        if rank:
            follow_leader(group, denoiser)
            return
        runner = GroupDenoiser(group, denoiser)
        run = run_ours(path, case, Pipeline(path, denoiser=runner))
        runner.close()
        tensors = {f"{step}:{branch}": t.contiguous() for (step, branch), t in run.outputs.items()}
        save_file({"images": torch.from_numpy(run.images.copy()), **tensors}, out)
    finally:
        group.close()


def test_caption_through_all_to_all_breaks_parity(tmp_path) -> None:
    case = next(c for c in CASES if c.name == "z-image-cfg-norm-truncation")
    tiny_checkpoint_cached(case.family, case.variant)  # build before the ranks start
    out = str(tmp_path / "broken.safetensors")
    port = free_port()
    torch.multiprocessing.start_processes(_broken_rank, args=(2, port, case, out), nprocs=2, start_method="spawn")
    broken = load_file(out)
    single = single_process(case)
    assert max_diff(broken.pop("images").numpy(), single.images) > 100 * IMAGE_TOLERANCE
    outputs = {tuple(k.split(":")): v for k, v in broken.items()}
    assert min(cosine(outputs[(str(s), b)], single.outputs[(s, b)]) for s, b in single.outputs) < MIN_COSINE


def test_ulysses_degree_not_dividing_the_heads_fails_at_start_up() -> None:
    path = tiny_checkpoint_cached("qwen-image")
    with pytest.raises(
        LayoutError, match=r"--ulysses 3 does not fit --sp 6 .*valid for --sp 6: --ulysses 2, --ulysses 1"
    ):
        with local_group(GroupSpec(path, 6, ulysses=3)):
            pass


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_failed_rank_fails_the_group_fast(tmp_path, fault: str) -> None:
    out = tmp_path / "out.npy"
    command = [sys.executable, "-m", "imagegen.cli", "generate", "--family", "qwen-image", "--prompt", "x"]
    # --ulysses 1: the group is a ring of 2, so a rank that dies or hangs mid-ring must fail the group too.
    command += ["--width", "64", "--height", "64", "--steps", "4", "--sp", "2", "--ulysses", "1"]
    command += ["--collective-timeout", "20"]
    command += ["--output", str(out)]
    env = {**os.environ, "IMAGEGEN_FAULT_INJECT": f"1:2:{fault}", "IMAGEGEN_TESTING": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert not out.exists()
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("imagegen: error: denoiser group failed"), proc.stderr[-2000:]


def test_error_in_the_callers_code_leaves_no_stale_group_behind() -> None:
    """Rank 0 lives in this process: if code inside `local_group` raises, the other ranks are released and this
    process's process group is gone, so the next group (of another size) forms and runs."""
    path = tiny_checkpoint_cached("qwen-image")
    with pytest.raises(LookupError, match="the caller's own error"):
        with local_group(GroupSpec(path, 2, threads=THREADS, timeout_s=60)):
            raise LookupError("the caller's own error")
    assert not dist.is_initialized()
    case = next(c for c in CASES if c.family == "qwen-image" and c.variant is None)
    pipeline, job, _ = encoded(case)
    with local_group(GroupSpec(path, 4, threads=THREADS, timeout_s=60)) as group:
        assert_matches_single_process(case, run_job(pipeline, job, group))
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("name", "width", "height", "sp", "ulysses"),
    [
        ("qwen-image-cfg", 64, 48, 2, None),  # 12 tokens: 6 rows a rank (Ulysses)
        ("qwen-image-cfg", 64, 64, 3, None),  # 16 tokens: 6 rows a rank (ring of 3)
        ("qwen-image-no-negative", 32, 32, 4, None),  # 4 tokens: 1 row a rank
    ],
    ids=["qwen-sp2", "qwen-sp3-ring", "qwen-sp4-one-row"],
)
def test_few_rows_per_rank_equal_one_process(name: str, width: int, height: int, sp: int, ulysses) -> None:
    """A rank with only a few rows would take another CPU GEMM kernel than one process (1.1e-6 and 1.4e-6 for
    the first two before the plan padded a local sequence to MIN_LOCAL_ROWS)."""
    case = PARITY_CASES[name].with_options(width=width, height=height)
    pipeline, job, single = encoded(case)
    spec = GroupSpec(pipeline.folder.path, sp, ulysses=ulysses, threads=THREADS, timeout_s=120)
    with local_group(spec) as group:
        parallel = run_job(pipeline, job, group)
    assert max_diff(parallel.images, single.images) <= IMAGE_TOLERANCE


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_group_spec_carries_every_layout_flag_to_the_ranks(command: str) -> None:
    """`imagegen generate` and `imagegen serve denoiser` build one GroupSpec from their flags; what a spawned
    rank receives (JSON) is that spec, every field included."""
    from imagegen.cli import build_parser

    flags = ["--sp", "4", "--ulysses", "1", "--cfg-parallel", "--collective-timeout", "7", "--kernels", "fast"]
    flags += ["--compile", "off", "--torch-threads", "3", "--ring-merge", "lse"]
    if command == "generate":
        args = build_parser().parse_args(["generate", "--prompt", "x", "--output", "o.png", *flags])
    else:
        args = build_parser().parse_args(["serve", "denoiser", *flags])
    stage = StageSettings(kernels="fast", compile="off", cuda_graphs=False, lora_cache_bytes=1 << 20)
    spec = GroupSpec.from_flags(args, "/models/m", "torch.bfloat16", "cuda", stage)
    expected = GroupSpec("/models/m", 4, True, 1, "bfloat16", "cuda", 7.0, 3, stage, "lse")
    assert spec == expected
    assert GroupSpec.from_json(spec.to_json()) == spec
