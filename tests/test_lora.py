"""LoRA adapters per request equal diffusers' `load_lora_weights` + `set_adapters` (CPU, float32, <= 1e-5), in
one process and on a `--sp 2` group, and leave nothing merged behind (the next request without adapters is the
base image bit for bit). The two tiny adapters differ in every way the loader must get right: diffusers keys
with alpha in the metadata (scaling 0.5) at rank 4, and the community kohya layout (`diffusion_model.*`,
`lora_down/lora_up`, `.alpha` tensors) that diffusers converts, at rank 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from imagegen.common.errors import InvalidArgument
from imagegen.common.lora import AdapterCache, AdapterError, LoraRegistry, read_adapter
from imagegen.common.lora.files import check_fits
from imagegen.common.lora.registry import check_lora_weights, with_lora_defaults
from imagegen.common.lora.tiny import adapted_linears, make_tiny_lora, random_lora
from imagegen.common.options import RequestOptions
from imagegen.common.parallel.launch import local_group
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import CASES, THREADS, Case, Run, _recorder, assert_parity, compare_runs, run_pipeline

# One scenario per family (Qwen with true CFG; Z-Image-Turbo, no CFG); the group runs them at sizes where each
# of its 2 ranks holds >= 16 rows (see tests/test_parallel.py).
FAMILIES = {"qwen-image": ("qwen-image-cfg", (128, 128)), "z-image": ("z-image-turbo", (144, 112))}
ONE = [("first", 0.7)]
TWO = [("first", 0.7), ("second", 1.3)]


pytestmark = pytest.mark.usefixtures("parity_threads")


@dataclasses.dataclass
class Lab:
    case: Case
    path: Path
    lora_dir: Path
    reference: DiffusionPipeline  # diffusers, both adapters loaded
    ours: Pipeline

    def diffusers(self, adapters: list[tuple[str, float]], case: Case | None = None) -> Run:
        self.reference.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        return run_pipeline(self.reference, case or self.case)

    def run(self, adapters: list[tuple[str, float]], pipeline: Pipeline | None = None) -> Run:
        outputs, hooks = _recorder()
        images = (pipeline or self.ours)(self.case.options, self.case.images(), hooks, loras=adapters)
        return Run(images, outputs)


_labs: dict[str, Lab] = {}


def lab_for(family: str, tmp_root: Path) -> Lab:
    if family not in _labs:
        case = CASES[FAMILIES[family][0]].with_options(steps=2)  # 2 steps: CI time; every layer still runs
        path = tiny_checkpoint_cached(case.family, case.variant)
        lora_dir = tmp_root / family
        make_tiny_lora(path, lora_dir / "first.safetensors", rank=4, seed=1, fmt="peft")
        make_tiny_lora(path, lora_dir / "second.safetensors", rank=2, seed=2, fmt="kohya")
        reference = DiffusionPipeline.from_pretrained(path)
        reference.set_progress_bar_config(disable=True)
        for name in ("first", "second"):
            reference.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
        _labs[family] = Lab(case, path, lora_dir, reference, Pipeline(path, lora_dir=lora_dir))
    return _labs[family]


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return lambda family: lab_for(family, root)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_and_two_adapters_equal_diffusers_and_nothing_stays_merged(labs, family: str) -> None:
    lab = labs(family)
    base = lab.run([])
    for adapters in (ONE, TWO):
        ours, reference = lab.run(adapters), lab.diffusers(adapters)
        assert_parity(ours, reference)
        # The adapters do change the image (far beyond the tolerance), so parity is not the base image's.
        assert compare_runs(ours, base)["image"] > 1e-2
    after = lab.run([])
    assert torch.equal(torch.from_numpy(after.images), torch.from_numpy(base.images))
    for key, output in base.outputs.items():
        assert torch.equal(after.outputs[key], output), key


def test_name_json_scheduler_shift_equals_diffusers_with_that_scheduler(labs) -> None:
    """A distilled adapter's NAME.json `scheduler_shift`: the schedule diffusers runs with
    `FlowMatchEulerDiscreteScheduler.from_config(config, shift=s, use_dynamic_shifting=False)`."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    lab = labs("qwen-image")
    distilled = lab.lora_dir / "distilled.safetensors"
    shutil.copy(lab.lora_dir / "first.safetensors", distilled)
    distilled.with_suffix(".json").write_text(json.dumps({"scheduler_shift": 3.0, "steps": 3}))
    outputs, hooks = _recorder()
    unset_steps = lab.case.with_options(steps=None)  # distilled.json gives them
    ours = Run(lab.ours(unset_steps.options, unset_steps.images(), hooks, loras=[("distilled", 1.3)]), outputs)
    original = lab.reference.scheduler
    lab.reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        original.config, shift=3.0, use_dynamic_shifting=False
    )
    try:
        reference = lab.diffusers([("first", 1.3)], lab.case.with_options(steps=3))
    finally:
        lab.reference.scheduler = original
    assert_parity(ours, reference)
    unshifted = lab.diffusers([("first", 1.3)], lab.case.with_options(steps=3))
    # The shift did change the schedule (not with 2 steps: shift_terminal pins the last sigma).
    assert compare_runs(ours, unshifted)["image"] > 1e-3


def test_fast_kernels_see_the_merge_through_their_fused_weights(labs) -> None:
    """The fast path's fused QKV / W13 buffers are views of the linears' weights: merging writes them too."""
    lab = labs("z-image")
    fast = Pipeline(lab.path, kernels="fast", compile="off", lora_dir=lab.lora_dir)
    base = lab.run([], fast)
    assert_parity(lab.run(TWO, fast), lab.diffusers(TWO))
    assert torch.equal(torch.from_numpy(lab.run([], fast).images), torch.from_numpy(base.images))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sp2_group_with_two_adapters_equals_diffusers(labs, family: str) -> None:
    lab = labs(family)
    width, height = FAMILIES[family][1]
    case = lab.case.with_options(width=width, height=height)
    images = case.images()
    pipeline = lab.ours
    base_job = pipeline.job(pipeline.resolve(case.options, images), images)
    lora_job = dataclasses.replace(base_job, loras=pipeline.lora_set(TWO))
    with local_group(GroupSpec(lab.path, 2, threads=THREADS, timeout_s=120)) as group:
        outputs, hooks = _recorder()
        ours = Run(pipeline.run_job(lora_job, hooks, group), outputs)
        after = pipeline.run_job(base_job, None, group)
    assert_parity(ours, lab.diffusers(TWO, case))
    # Every rank restored its weights: the group's next image is the one-process base image (to SP rounding).
    assert float(abs(after - pipeline.run_job(base_job)).max()) <= 1e-6


# ------------------------------------------------------------------------------------------- files, registry
@pytest.fixture(scope="module")
def qwen_transformer():
    from imagegen.common.checkpoint import open_model_folder

    return open_model_folder(tiny_checkpoint_cached("qwen-image")).load("transformer", torch.float32, "cpu")


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def test_peft_metadata_sets_the_scaling_and_kohya_alpha_is_folded(tmp_path, qwen_transformer) -> None:
    for fmt in ("peft", "kohya"):
        tensors, header = random_lora(qwen_transformer, rank=4, seed=3, fmt=fmt)
        adapter = read_adapter(_write(tmp_path / f"{fmt}.safetensors", tensors, header), "qwen-image")
        layer = adapter.layers["transformer_blocks.0.attn.to_q"]
        delta = layer.scaling * layer.up.double() @ layer.down.double()
        if fmt == "peft":
            assert layer.scaling == 0.5
            expected = 0.5 * tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].double()
        else:  # the converter folds alpha / rank = 0.5 into the factors; PEFT's scaling is then 1
            assert layer.scaling == 1.0
            expected = 0.5 * tensors["diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight"].double()
        down = tensors[next(k for k in tensors if "blocks.0.attn.to_q.lora_" in k and ("A" in k or "down" in k))]
        assert torch.allclose(delta, expected @ down.double(), atol=1e-6)
        assert len(adapter.layers) == len([k for k in tensors if "lora_A" in k or "lora_down" in k])


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_kohya_flat_lora_unet_names_convert_like_the_dotted_ones(tmp_path, family: str) -> None:
    """`lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` (module paths flattened with underscores):
    diffusers' converter restores every module path, so the adapter equals its dotted `diffusion_model.` twin."""
    from imagegen.common.checkpoint import open_model_folder

    transformer = open_model_folder(tiny_checkpoint_cached(family)).load("transformer", torch.float32, "cpu")
    tensors, _ = random_lora(transformer, rank=2, seed=4, fmt="kohya")
    flat = {}
    for key, value in tensors.items():
        module, dot, suffix = key.removeprefix("diffusion_model.").rpartition(".lora_" if ".lora_" in key else ".")
        flat["lora_unet_" + module.replace(".", "_") + dot + suffix] = value
    dotted = read_adapter(_write(tmp_path / "dotted.safetensors", tensors), family)
    flattened = read_adapter(_write(tmp_path / "flat.safetensors", flat), family)
    assert sorted(flattened.layers) == sorted(dotted.layers) == sorted(adapted_linears(transformer))
    for module, layer in dotted.layers.items():
        twin = flattened.layers[module]
        assert torch.equal(twin.up, layer.up) and torch.equal(twin.down, layer.down)


def test_files_that_are_not_loras_for_this_model_are_refused(tmp_path, qwen_transformer) -> None:
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    cases = {
        "text_encoder_only": ({"text_encoder.x.lora_A.weight": a, "text_encoder.x.lora_B.weight": b}, "no transformer"),
        "lokr": ({"transformer.transformer_blocks.0.attn.to_q.lokr_w1": a}, "LoKr"),
        "dora": (
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
                "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(32),
            },
            "DoRA",
        ),
        "half_pair": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a}, "both lora_A and lora_B"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            read_adapter(_write(tmp_path / f"{name}.safetensors", tensors), "qwen-image")
    with pytest.raises(AdapterError, match="safetensors"):
        read_adapter(tmp_path / "weights.bin", "qwen-image")
    # Well-formed, but for another model: a module it lacks, and one of another size.
    for module, message in (("transformer_blocks.0.attn.to_zz", "no module"), ("img_in", "in the model")):
        tensors = {f"transformer.{module}.lora_A.weight": torch.randn(2, 7), f"transformer.{module}.lora_B.weight": b}
        adapter = read_adapter(_write(tmp_path / "other.safetensors", tensors), "qwen-image")
        with pytest.raises(AdapterError, match=message):
            check_fits(adapter, qwen_transformer, "other")


def test_registry_names_scales_and_defaults(tmp_path) -> None:
    (tmp_path / "lightning.safetensors").write_bytes(b"")
    (tmp_path / "lightning.json").write_text(json.dumps({"steps": 8, "guidance_scale": 1.0, "scheduler_shift": 3}))
    (tmp_path / "bad.json").write_text(json.dumps({"scheduler_shift": -1}))
    registry = LoraRegistry(tmp_path)
    assert registry.names() == ["lightning"]
    with pytest.raises(InvalidArgument) as unknown:
        registry.path("nope", "loras[1].name")
    assert unknown.value.field == "loras[1].name" and "lightning" in str(unknown.value)
    for weights, field in (
        ([("../etc/passwd", 1.0)], "loras[0].name"),
        ([("a", 1.0), ("a", 0.5)], "loras[1].name"),
        ([("a", float("nan"))], "loras[0].scale"),
        ([("a", 100.0)], "loras[0].scale"),
        ([(f"a{i}", 1.0) for i in range(9)], "loras"),
    ):
        with pytest.raises(InvalidArgument) as bad:
            check_lora_weights(weights)
        assert bad.value.field == field
    options = with_lora_defaults(RequestOptions("x", steps=None, guidance_scale=3.0), [registry.defaults("lightning")])
    assert (options.steps, options.guidance_scale) == (8, 3.0)  # the request's own value wins
    assert registry.defaults("lightning").scheduler_shift == 3.0
    with pytest.raises(ValueError, match="scheduler_shift"):
        registry.defaults("bad")


def test_cache_is_bounded_in_bytes_and_reloads_a_replaced_file(tmp_path, qwen_transformer) -> None:
    paths = []
    for seed in range(3):
        tensors, header = random_lora(qwen_transformer, rank=2, seed=seed)
        paths.append(_write(tmp_path / f"l{seed}.safetensors", tensors, header))
    one = read_adapter(paths[0], "qwen-image").nbytes
    cache = AdapterCache(qwen_transformer, "qwen-image", max_bytes=2 * one)
    for path in paths:
        cache.get(path)
    assert cache.nbytes <= 2 * one and cache.loads == 3
    cache.get(paths[2])
    assert cache.loads == 3  # still cached
    cache.get(paths[0])
    assert cache.loads == 4  # evicted as least recently used, read again
    tensors, header = random_lora(qwen_transformer, rank=2, seed=9)
    _write(paths[0], tensors, header)
    assert cache.get(paths[0]).layers["transformer_blocks.0.attn.to_q"].down.shape[0] == 2
    assert cache.loads == 5  # a replaced file (new mtime/size) is read again


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_lora_flag_and_make_tiny_lora(tmp_path, capsys) -> None:
    from imagegen.cli import main
    from imagegen.common.lora.registry import parse_lora

    assert parse_lora("style") == ("style", 1.0)
    assert parse_lora("style:0.8") == ("style", 0.8)
    assert parse_lora("/x/a:b.safetensors") == ("/x/a:b.safetensors", 1.0)
    qwen, zimage = tiny_checkpoint_cached("qwen-image"), tiny_checkpoint_cached("z-image")
    adapter = tmp_path / "loras" / "style.safetensors"
    assert main(["make-tiny-lora", "--model", str(qwen), "--out", str(adapter), "--rank", "3", "--seed", "5"]) == 0
    (tmp_path / "loras" / "style.json").write_text(json.dumps({"steps": 2}))  # the request sets no --steps
    request = ["generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--seed", "3"]
    out = tmp_path / "a.npy"
    assert main([*request, "--lora", "style:0.7", "--lora-dir", str(tmp_path / "loras"), "--output", str(out)]) == 0
    options = RequestOptions("a fox", width=64, height=64, seed=3, steps=2)
    expected = Pipeline(qwen)(options, loras=[(str(adapter), 0.7)])
    assert torch.equal(torch.from_numpy(numpy_load(out)), torch.from_numpy(expected))
    capsys.readouterr()
    wrong = tmp_path / "z.safetensors"
    make_tiny_lora(zimage, wrong, rank=2)
    for lora, field in (("nope", "loras[0].name"), ("style:99", "loras[0].scale"), (f"{wrong}:1", "loras[0].name")):
        argv = [*request, "--steps", "2", "--lora", lora, "--lora-dir", str(tmp_path / "loras"), "--output", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"imagegen: error: {field}"), err
    assert "does not fit" in err


def numpy_load(path: Path):
    import numpy as np

    return np.load(path, allow_pickle=False)


def test_gpu_benchmark_smoke(capsys) -> None:
    """`bench/lora_gpu.py --smoke`: the GPU benchmark's own code on the CPU with the tiny checkpoints."""
    from bench.lora_gpu import main as bench_main

    assert bench_main(["--smoke", "--workloads", "z-image-turbo-1024"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = next(line for line in lines if line["event"] == "summary")
    assert summary["restored_bitwise"] and summary["saved_gib"] > 0
    fidelity = next(line for line in lines if line["event"] == "fidelity")
    assert 0 < fidelity["lora_max_abs"] <= 1e-4  # merged vs PEFT's side terms: rounding only (float32 here)
    assert {line["after"] for line in lines if line["event"] == "switch"} == {"a", "b", "a+b", "none"}


def test_helm_chart_points_the_denoiser_at_the_models_lora_folder(tmp_path) -> None:
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    helm = subprocess.run(
        [sys.executable, str(root / "helm" / "tools" / "install_helm.py"), str(Path.home() / ".cache/imagegen/helm")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.splitlines()[-1]
    models = [
        {"id": "qwen-image", "family": "qwen-image", "path": "Qwen-Image", "loraPath": "loras/qwen"},
        {"id": "z-image", "family": "z-image", "path": "Z-Image"},
    ]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"models": models}))
    proc = subprocess.run(
        [helm, "template", "r", str(root / "helm" / "imagegen"), "-f", str(values), "--kube-version", "1.33.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lora_dirs = {}
    for doc in yaml.safe_load_all(proc.stdout):
        if (
            doc
            and doc.get("kind") == "Deployment"
            and doc["metadata"]["labels"].get("app.kubernetes.io/component") == "denoiser"
        ):
            container = doc["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            lora_dirs[doc["metadata"]["labels"]["imagegen/model"]] = env.get("IMAGEGEN_LORA_DIR")
    assert lora_dirs == {"qwen-image": "/models/loras/qwen", "z-image": None}


def test_jobs_with_different_adapter_sets_never_share_a_batch(labs) -> None:
    from imagegen.common.batching import batch_key

    lab = labs("qwen-image")
    pipeline = lab.ours
    job = pipeline.job(pipeline.resolve(lab.case.options))
    one, two = (dataclasses.replace(job, loras=pipeline.lora_set(s)) for s in (ONE, TWO))
    rescaled = dataclasses.replace(job, loras=pipeline.lora_set([("first", 0.5)]))
    keys = [batch_key(j) for j in (job, one, two, rescaled)]
    assert len(set(keys)) == 4 and batch_key(dataclasses.replace(one)) == keys[1]
    with pytest.raises(ValueError, match="different LoRA sets"):  # the stage refuses a mixed batch outright
        pipeline.denoiser.run_batch([job, one], [None, None])
