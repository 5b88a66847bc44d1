"""LoRA on one GPU: denoise step time with a rank-32 adapter against none, and the cost of switching adapters.

Per workload the full-size transformer (published config, random bf16 weights, as `bench/e2e_gpu.py` builds
it) is hosted by our denoise stage on the production path (fast kernels, compiled blocks, CUDA graphs); two
random rank-R adapters covering every block linear are written as bf16 safetensors files. Measured:

* `step_s`: denoise time / steps, median of --runs, without adapters and with adapter A merged (the
  issue's target: with / without <= 1.1);
* `switch_s`: `use_loras` from one set to another (restore the saved weights, merge the next set; none -> A,
  A -> B, B -> A + B, A + B -> none), adapters already in the cache (target <= 0.5 s); `load_s`: first read
  of an adapter file onto the device (cold cache);
* `restored_bitwise`: the latents of a base run after the adapters equal a base run's before them bit for bit
  (`base_repeat_bitwise`: the first base run, which compiles and captures, against the second);
* fidelity: the merged fast path's final latents against PEFT's arithmetic (side terms on the base weights, on
  the reference kernels) with adapter A, next to the fast path against the reference kernels without adapters
  (cosine and max |diff|; merging rounds `W + delta` to the model dtype once, as diffusers' `fuse_lora` does);
  `saved_gib`: the copy of the touched weights kept while a set is merged, `peak_gib`: CUDA peak memory.

    python bench/lora_gpu.py [--workloads qwen-image-1024,z-image-turbo-1024] [--rank 32] [--runs 2]
    python bench/lora_gpu.py --smoke      # the same code on the CPU with the tiny checkpoints (CI runs it)

One JSON line per measurement, then a `summary` line per workload with `ok` against both targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bench.compare import cosine
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.families import get_family
from imagegen.common.lora.tiny import random_lora
from imagegen.common.stage_settings import StageSettings

# (family, variant, size, steps, job index of `warmup_jobs`: 0 = CFG, 1 = no CFG)
WORKLOADS = {
    "qwen-image-1024": ("qwen-image", None, 1024, 8, 0),
    "z-image-turbo-1024": ("z-image", "turbo", 1024, 8, 1),
}
SMOKE_SIZE, SMOKE_STEPS, SMOKE_RANK = 64, 2, 4
STEP_RATIO_TARGET, SWITCH_TARGET_S = 1.1, 0.5


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call):
    sync()
    start = time.perf_counter()
    value = call()
    sync()
    return value, time.perf_counter() - start


def build_transformer(family: str, smoke: bool, folder):
    if smoke:
        return folder.load("transformer", torch.float32, "cpu")
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    from bench.e2e_gpu import _build, _scaled_linears

    if family.startswith("qwen"):
        return _scaled_linears(_build(QwenImageTransformer2DModel, {}, 1), 0.5)
    config = dict(
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        cap_feat_dim=2560,
        axes_dims=[32, 48, 48],
        axes_lens=[1024, 512, 512],
    )
    return _scaled_linears(_build(ZImageTransformer2DModel, config, 1), 0.5)


def merge_fidelity(family, stage, transformer, folder, job, loras, base: torch.Tensor) -> dict:
    """What merging costs in the model dtype: the merged fast path against PEFT's own arithmetic (base weights,
    `out + scale * scaling * B(A(x))` added by a forward hook on each adapted linear) on the reference kernels,
    next to the fast path's own rounding against the reference kernels without adapters."""
    merged = stage.run(dataclasses.replace(job, loras=loras))
    stage.use_loras(())  # the base weights back: the side terms go on top of them
    reference = family.denoiser.from_transformer(
        transformer, folder.scheduler_config(), StageSettings(kernels="reference", compile="off")
    )
    base_reference = reference.run(job)
    hooks = []
    for path, scale in loras:
        adapter = stage.adapters.get(path)
        for module, layer in adapter.layers.items():

            def side_term(linear, args, out, layer=layer, scale=scale):
                x = args[0].to(layer.down.dtype)
                return out + (F.linear(F.linear(x, layer.down), layer.up) * (scale * layer.scaling)).to(out.dtype)

            hooks.append(transformer.get_submodule(module).register_forward_hook(side_term))
    try:
        side_terms = reference.run(job)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(
        lora_cosine=round(cosine(merged, side_terms), 9),
        lora_max_abs=float(f"{float((merged.float() - side_terms.float()).abs().max()):.3g}"),
        base_cosine=round(cosine(base, base_reference), 9),
        base_max_abs=float(f"{float((base.float() - base_reference.float()).abs().max()):.3g}"),
    )


def bench_workload(name: str, args, out_dir: Path) -> dict:
    family_name, variant, size, steps, job_index = WORKLOADS[name]
    from imagegen.common.tiny import tiny_checkpoint_cached

    folder = open_model_folder(tiny_checkpoint_cached(family_name, variant))
    family = get_family(family_name)
    smoke = args.smoke
    size, steps, rank = (SMOKE_SIZE, SMOKE_STEPS, SMOKE_RANK) if smoke else (size, steps, args.rank)
    transformer = build_transformer(family_name, smoke, folder)
    kernels, compile = ("reference", "off") if smoke else ("fast", args.compile)
    settings = StageSettings(kernels=kernels, compile=compile)
    stage = family.denoiser.from_transformer(transformer, folder.scheduler_config(), settings)
    config = dict(transformer.config)
    job = family.warmup_jobs(size, size, config)[job_index]
    job = dataclasses.replace(job, options=dataclasses.replace(job.options, steps=steps, seed=7))
    dtype = torch.float32 if smoke else torch.bfloat16
    paths = []
    for seed, label in ((1, "a"), (2, "b")):
        tensors, header = random_lora(transformer, rank=rank, seed=seed, dtype=dtype)
        paths.append(out_dir / f"{name}-{label}.safetensors")
        save_file(tensors, paths[-1], metadata=header)
    sets = {"none": (), "a": ((str(paths[0]), 1.0),), "b": ((str(paths[1]), 0.8),)}
    sets["a+b"] = (*sets["a"], *sets["b"])

    def run(loras) -> tuple[torch.Tensor, float]:
        return timed(lambda: stage.run(dataclasses.replace(job, loras=loras)))

    base, first_s = run(())  # compiles and captures (the fast path)
    repeat, _ = run(())  # a base run replayed: tells an inexact restore apart from a run-to-run difference
    emit(workload=name, event="first_request", seconds=round(first_s, 3))
    for label in ("a", "b"):  # cold loads, timed on their own
        _, load_s = timed(lambda label=label: stage.adapters.get(sets[label][0][0]))
        emit(workload=name, event="load", adapter=label, seconds=round(load_s, 4))
    steps_s = {"none": [], "a": []}
    for label in ("none", "a"):
        run(sets[label])  # switches to the set (untimed): the timed runs below measure steps only
        for _ in range(args.runs):
            _, seconds = run(sets[label])
            steps_s[label].append(seconds / steps)
    medians = {label: statistics.median(values) for label, values in steps_s.items()}
    emit(workload=name, event="step_time", **{f"{k}_s": round(v, 5) for k, v in medians.items()})
    switches = []
    for before, after in (("none", "a"), ("a", "b"), ("b", "a+b"), ("a+b", "none")) * args.runs:
        stage.use_loras(sets[before])
        _, seconds = timed(lambda after=after: stage.use_loras(sets[after]))
        switches.append(seconds)
        emit(workload=name, event="switch", before=before, after=after, seconds=round(seconds, 4))
    stage.use_loras(sets["a+b"])
    saved_gib = stage.lora_slot.saved_bytes / 2**30
    again, _ = run(())
    fidelity = merge_fidelity(family, stage, transformer, folder, job, sets["a"], base)
    emit(workload=name, event="fidelity", **fidelity)
    summary = dict(
        workload=name,
        event="summary",
        rank=rank,
        steps=steps,
        step_none_s=round(medians["none"], 5),
        step_lora_s=round(medians["a"], 5),
        step_ratio=round(medians["a"] / medians["none"], 4),
        switch_median_s=round(statistics.median(switches), 4),
        switch_max_s=round(max(switches), 4),
        restored_bitwise=bool(torch.equal(again, repeat)),
        base_repeat_bitwise=bool(torch.equal(repeat, base)),
        merged_vs_side_terms_cosine=fidelity["lora_cosine"],
        fast_vs_reference_cosine=fidelity["base_cosine"],
        saved_gib=round(saved_gib, 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    )
    summary["ok"] = bool(
        summary["restored_bitwise"]
        and summary["step_ratio"] <= STEP_RATIO_TARGET
        and summary["switch_max_s"] <= SWITCH_TARGET_S
    )
    emit(**summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--compile", choices=["on", "off"], default="on", help="the fast path's compiled blocks")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = 1
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    results = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            if name not in WORKLOADS:
                parser.error(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            results.append(bench_workload(name, args, Path(tmp)))
            gc.collect()  # the workload's transformer and its saved weights go before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    # Smoke runs check the code path and the exact restore, not CPU timings.
    return 0 if all(r["restored_bitwise"] and (args.smoke or r["ok"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
