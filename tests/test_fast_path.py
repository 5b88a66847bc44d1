"""The fast kernel path (the default on CUDA) as the CPU can check it.

On the CPU in float32 the fast path must meet the reference path's own contract: final images and every step's
DiT output within 1e-5 of diffusers run in this session, for every parity scenario (batched CFG with prompts of
different lengths, edits, Edit-2511's zero_cond_t, Z-Image's truncation and norm clip), and the trap tests must
break it as they break the reference. Its compiled form is traced whole (no graph breaks) and once: prompts of
other lengths and edit images of other sizes reuse the same graphs. The GPU-only parts (inductor kernels, CUDA
graphs, the measured attention kernel, the GELU epilogue) run in bench/gpu_smoke.sh and bench/e2e_gpu.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from imagegen.common import kernels
from imagegen.common.denoise import StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families import get_family
from imagegen.common.families.qwen_image import pipeline as qwen_pipeline
from imagegen.common.families.qwen_image.dit_fast import QwenFastDiT
from imagegen.common.pipeline import Pipeline
from imagegen.common.rope import Rotary
from imagegen.common.stage_settings import StageSettings
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.common.warmup import parse_sizes, warm_up
from tests.parity import CASES, TOLERANCE, assert_parity, compare_runs, reference_run, run_ours

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("parity_threads")


def fast_pipeline(name: str, compile: str = "off") -> tuple[Path, Pipeline]:
    case = CASES[name]
    path = tiny_checkpoint_cached(case.family, case.variant)
    return path, Pipeline(path, kernels="fast", compile=compile)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_matches_diffusers(name: str) -> None:
    path, pipeline = fast_pipeline(name)
    assert pipeline.denoiser.kernels == "fast"
    assert_parity(run_ours(path, CASES[name], pipeline), reference_run(name))


def test_fast_path_traps(monkeypatch) -> None:
    """The checks above can fail on the fast path: CFG without the norm rescale, RoPE tables in bf16."""
    case = CASES["qwen-image-cfg"]
    path, pipeline = fast_pipeline(case.name)
    with monkeypatch.context() as patch:
        patch.setattr(qwen_pipeline, "qwen_true_cfg", lambda pos, neg, scale: neg + scale * (pos - neg))
        assert max(compare_runs(run_ours(path, case, pipeline), reference_run(case.name)).values()) > 100 * TOLERANCE

    def bf16_tables(freqs: torch.Tensor) -> Rotary:
        return Rotary(torch.complex(freqs.real.bfloat16().float(), freqs.imag.bfloat16().float()))

    monkeypatch.setattr(Rotary, "from_complex", staticmethod(bf16_tables))
    assert max(compare_runs(run_ours(path, case, pipeline), reference_run(case.name)).values()) > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["qwen-image-cfg", "qwen-image-edit-plus-two-images", "z-image-cfg-norm-truncation"])
def test_compiled_blocks_trace_whole_and_once(name: str, monkeypatch) -> None:
    """fullgraph compilation (dynamo with the eager backend: the tracing inductor sees, without codegen) gives
    the reference results, and a second request of another image size, prompt length (and edit image sizes)
    compiles nothing new (the image and text dims are dynamic) and gives the reference path's result."""
    monkeypatch.setenv(kernels.COMPILE_BACKEND_ENV, "eager")
    torch._dynamo.reset()
    counters.clear()
    case = CASES[name]
    path, pipeline = fast_pipeline(name, compile="on")
    assert_parity(run_ours(path, case, pipeline), reference_run(name))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    other = dataclasses.replace(
        case.options,
        prompt=case.options.prompt + " under a long winter sky, in oils",
        width=case.options.width + 32,
        height=case.options.height + 16,
    )
    sizes = tuple((w + 16, h + 32) for w, h in case.image_sizes)
    again = dataclasses.replace(case, options=other, image_sizes=sizes)
    result = run_ours(path, again, pipeline)
    assert result.images.shape[1:3] == (other.height, other.width)
    assert counters["stats"]["unique_graphs"] == graphs, "a new image size or prompt length recompiled"
    assert_parity(result, run_ours(path, again, Pipeline(path, kernels="reference")))
    torch._dynamo.reset()


def test_kernel_and_compile_choices(monkeypatch) -> None:
    monkeypatch.setenv("IMAGEGEN_KERNELS", "reference")  # read by the flag layer only, never here
    assert kernels.resolve_kernels(None, "cpu") == "reference"
    assert kernels.resolve_kernels(None, torch.device("cuda")) == "fast"
    assert kernels.resolve_kernels("fast", "cpu") == "fast"
    assert kernels.resolve_kernels("reference", torch.device("cuda")) == "reference"
    with pytest.raises(InvalidArgument) as error:
        kernels.resolve_kernels("quick", "cpu")
    assert error.value.field == "kernels"
    with pytest.raises(InvalidArgument) as error:
        kernels.resolve_compile("sometimes")
    assert error.value.field == "compile"


def test_compile_only_where_it_pays_back(tmp_path) -> None:
    transformer = Pipeline(tiny_checkpoint_cached("z-image", "turbo")).denoiser.dit.transformer
    marker = kernels.CompileMarker(transformer, tmp_path)
    cuda = torch.device("cuda")
    assert not kernels.should_compile("auto", 100, marker, cuda), "a cold cache never pays back in one run"
    marker.write()
    assert kernels.should_compile("auto", 100, marker, cuda)
    assert not kernels.should_compile("auto", 8, marker, cuda), "too few forwards to repay tracing"
    assert kernels.should_compile("on", 1, marker, cuda) and not kernels.should_compile("off", 100, marker, cuda)
    assert not kernels.should_compile("auto", 100, marker, torch.device("cpu"))


def test_fused_projections_are_views_of_unchanged_weights() -> None:
    transformer = Pipeline(tiny_checkpoint_cached("qwen-image")).denoiser.dit.transformer
    attn = transformer.transformer_blocks[0].attn
    before = [lin.weight.detach().clone() for lin in (attn.to_q, attn.to_k, attn.to_v)]
    keys = set(transformer.state_dict())
    QwenFastDiT(transformer)
    QwenFastDiT(transformer)  # idempotent: a second fast stage on the same modules fuses nothing twice
    fused = attn.img_qkv_weight
    for lin, weight in zip((attn.to_q, attn.to_k, attn.to_v), before, strict=True):
        assert torch.equal(lin.weight, weight)
        assert lin.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert set(transformer.state_dict()) == keys, "the fused buffers must not change saved checkpoints"


def test_warm_up_sizes() -> None:
    family = get_family("qwen-image")
    assert parse_sizes("default", family) == [(1024, 1024), (1536, 1024), (1024, 1536)]
    assert parse_sizes("default", get_family("qwen-image-edit")) == [(1024, 1024), (1536, 1024), (1024, 1536)]
    assert parse_sizes("64x48, 32x32", family) == [(64, 48), (32, 32)]
    assert parse_sizes("none", family) == []
    for bad in ("64", "64x50", "axb"):
        with pytest.raises(InvalidArgument) as error:
            parse_sizes(bad, family)
        assert error.value.field == "warmup_sizes"


class CountingEngine:
    """A denoise stage that records the jobs warm-up runs through it (single jobs and batches)."""

    def __init__(self, stage) -> None:
        self.stage, self.calls = stage, []

    def run(self, job, hooks):
        self.calls.append(("run", job.options.width, job.options.height, job.negative_embeds is not None))
        return self.stage.run(job, hooks)

    def run_batch(self, jobs, hooks):
        self.calls.append(("batch", jobs[0].options.width, jobs[0].options.height, len(jobs)))
        return self.stage.run_batch(jobs, hooks)


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-edit-plus", "z-image"])
def test_warm_up_compiles_once_for_every_size(name: str, monkeypatch) -> None:
    """Warm-up runs the family's CFG and no-CFG jobs of every size, alone and (batching on) as a batch of two;
    the blocks compile for the first size only, and a request of a size never warmed up compiles nothing."""
    monkeypatch.setenv(kernels.COMPILE_BACKEND_ENV, "eager")
    torch._dynamo.reset()
    counters.clear()
    folder = Pipeline(tiny_checkpoint_cached(name)).folder
    family = get_family(name)
    stage = family.denoiser(folder, torch.float32, "cpu", StageSettings(kernels="fast", compile="on"))
    engine = CountingEngine(stage)
    config = folder.config("transformer")
    warm_up(engine, family, config, [(32, 32)], max_batch=2)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2, "warm-up compiled nothing"
    warm_up(engine, family, config, [(64, 32), (32, 48)], max_batch=2)
    assert counters["stats"]["unique_graphs"] == graphs, "a second warm-up size recompiled"
    expected = []
    for width, height in ((32, 32), (64, 32), (32, 48)):
        for cfg in (True, False):
            expected += [("run", width, height, cfg), ("batch", width, height, 2)]
    assert engine.calls == expected
    job = family.warmup_jobs(48, 64, config)[0]
    assert torch.isfinite(stage.run(job, StepHooks())).all()
    assert counters["stats"]["unique_graphs"] == graphs, "a request of a size never warmed up recompiled"
    torch._dynamo.reset()


def test_e2e_benchmark_smoke() -> None:
    """`bench/e2e_gpu.py --smoke`: the GPU benchmark's own code on the CPU with the tiny checkpoints."""
    proc = subprocess.run(
        [sys.executable, "bench/e2e_gpu.py", "--smoke", "--workloads", "qwen-image-1024,z-image-cfg-1024"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| qwen-image-1024", "| z-image-cfg"))]
    assert len(rows) == 2, proc.stdout[-2000:]
    for row in rows:
        psnr = float(row.split("|")[6])
        assert psnr > 80, row


def test_cli_kernels_flag(tmp_path, capsys) -> None:
    from imagegen.cli import main as cli_main

    model = str(tiny_checkpoint_cached("qwen-image"))
    common = ["generate", "--model", model, "--prompt", "a red fox", "--negative-prompt", " ", "--steps", "2"]
    common += ["--width", "32", "--height", "32", "--seed", "9"]
    outputs = {}
    for kernels_path in ("fast", "reference"):
        out = tmp_path / f"{kernels_path}.npy"
        assert cli_main([*common, "--kernels", kernels_path, "--compile", "off", "--output", str(out)]) == 0
        outputs[kernels_path] = np.load(out)
    assert np.abs(outputs["fast"] - outputs["reference"]).max() <= TOLERANCE
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*common, "--kernels", "quick", "--output", str(tmp_path / "x.npy")])
    assert exit_info.value.code == 2 and "--kernels" in capsys.readouterr().err
