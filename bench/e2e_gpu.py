"""End to end on one GPU: diffusers' pipeline and ours on the same full-size random-weight modules.

For each workload the components are built from the published configs (`shared/docs/full-size-configs.md`)
directly on the GPU in bf16 with a fixed seed; tokenizers, processors and scheduler configs come from a tiny
checkpoint (only their sizes matter). The SAME module objects go to `DiffusionPipeline.from_pretrained(...,
transformer=..., text_encoder=..., vae=...)` and to our `Pipeline`, which run end to end (encode, denoise,
decode) alternating. Printed per workload: time of each, our per-stage time, the first (compiling, capturing)
request, and the fidelity of our fast path against diffusers (final-image PSNR and max |diff|, every step's
model-output cosine); `--kernels reference` is checked bitwise against diffusers on a short run.

    python bench/e2e_gpu.py [--workloads qwen-image-1024,z-image-turbo-1024,...] [--runs 2] [--profile]
    python bench/e2e_gpu.py --smoke      # the same code on the CPU with the tiny checkpoints (CI runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLQwenImage21,
    DiffusionPipeline,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    ZImageTransformer2DModel,
)

from bench.compare import cosine, psnr
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.denoise import StepHooks
from imagegen.common.images import to_float_array
from imagegen.common.kernels import attention_choices, configure_compiler
from imagegen.common.options import RequestOptions
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import Case, run_pipeline

PROMPT = "a red fox standing in fresh snow at dawn, soft golden light, shallow depth of field, highly detailed"


@dataclass(frozen=True)
class Workload:
    family: str
    variant: str | None
    size: int
    steps: int
    guidance: float
    negative: str | None
    input_images: int = 0


WORKLOADS = {
    "qwen-image-1024": Workload("qwen-image", None, 1024, 50, 4.0, " "),
    "z-image-turbo-1024": Workload("z-image", "turbo", 1024, 8, 0.0, None),
    "z-image-cfg-1024": Workload("z-image", None, 1024, 30, 4.0, ""),
    "qwen-image-edit-plus-1024": Workload("qwen-image-edit-plus", None, 1024, 20, 4.0, " ", input_images=1),
    "qwen-image-2048": Workload("qwen-image", None, 2048, 8, 4.0, " "),
    # QwenImage21Pipeline's defaults: 40 steps, true_cfg_scale 1.0 (no CFG).
    "qwen-image-2.1-1024": Workload("qwen-image-2.1", None, 1024, 40, 1.0, None),
}
SMOKE_SIZE, SMOKE_STEPS = 64, 3
# Z-Image's FLUX-style VAE (shared/docs/full-size-configs.md)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


# ---------------------------------------------------------------------------------------- full-size modules
def _scaled_linears(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Random linear weights at a fraction of their default scale keep 60 bf16 layers finite."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)
    return model


def _build(cls, config: dict, seed: int):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = cls(**config) if isinstance(config, dict) else cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _resize(config, **values) -> None:
    """A tiny checkpoint's config (its special-token ids) at the published sizes."""
    for key, value in values.items():
        setattr(config, key, value)
    if "num_hidden_layers" in values:
        config.layer_types = ["full_attention"] * values["num_hidden_layers"]


# Z-Image's DiT (shared/docs/full-size-configs.md)
Z_IMAGE_DIT = dict(
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)


# Qwen-Image-2.1's Qwen3-VL-8B text encoder (docs/benchmarks.md, "config used"); special-token ids stay the tiny's.
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3_VL_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)


def full_size_transformer(family: str) -> torch.nn.Module:
    """The published DiT of `family` with random weights, on the GPU in bf16."""
    if family == "qwen-image-2.1":  # the class defaults are the published shapes
        return _scaled_linears(_build(QwenImage21Transformer2DModel, {}, 1), 0.5)
    if family.startswith("qwen"):
        return _scaled_linears(_build(QwenImageTransformer2DModel, {}, 1), 0.5)
    return _scaled_linears(_build(ZImageTransformer2DModel, Z_IMAGE_DIT, 1), 0.5)


def full_size_vae(family: str) -> torch.nn.Module:
    if family == "qwen-image-2.1":
        return _build(AutoencoderKLQwenImage21, {}, 3)
    if family.startswith("qwen"):
        return _build(AutoencoderKLQwenImage, {}, 3)
    return _build(AutoencoderKL, FLUX_VAE, 3)


def full_size_modules(family: str, folder) -> dict:
    """The published architectures with random weights, on the GPU, for `family`'s pipeline."""
    transformer = full_size_transformer(family)
    if family == "qwen-image-2.1":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        config = Qwen3VLConfig.from_dict(folder.config("text_encoder"))
        _resize(config.text_config, **QWEN3_VL_8B_TEXT)
        _resize(config.vision_config, **QWEN3_VL_8B_VISION)
        text_encoder = _build(Qwen3VLForConditionalGeneration, config, 2)
    elif family.startswith("qwen"):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig.from_dict(folder.config("text_encoder"))
        _resize(
            config.text_config,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        )
        _resize(
            config.vision_config,
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
        text_encoder = _build(Qwen2_5_VLForConditionalGeneration, config, 2)
    else:
        from transformers import Qwen3Config, Qwen3Model

        config = Qwen3Config.from_dict(folder.config("text_encoder"))
        _resize(
            config,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        )
        text_encoder = _build(Qwen3Model, config, 2)
    vae = full_size_vae(family)
    return {"transformer": transformer, "text_encoder": text_encoder, "vae": vae, "processors": Processors(transformer)}


def widen_vision_processor(pipe_folder):
    """The tiny processor caps vision pixels low for CPU speed; full size uses the real Qwen2-VL bounds."""
    processor = pipe_folder.load("processor")
    image_processor = processor.image_processor
    image_processor.min_pixels, image_processor.max_pixels = 3136, 12845056
    image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    return processor


# ------------------------------------------------------------------------------------------------ the runs
class Processors:
    """diffusers' attention processors and ours share one transformer: each run gets its own."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.attentions = [m for m in transformer.modules() if hasattr(m, "set_processor")]
        self.diffusers = [m.processor for m in self.attentions]

    def capture_ours(self) -> None:
        self.ours = [m.processor for m in self.attentions]

    def use(self, which: str) -> None:
        chosen = self.diffusers if which == "diffusers" else self.ours
        for module, processor in zip(self.attentions, chosen, strict=True):
            module.set_processor(processor)


def run_diffusers(pipe, case: Case, images) -> tuple[np.ndarray, float, dict]:
    sync()
    start = time.perf_counter()
    run = run_pipeline(pipe, case, images)
    sync()
    return np.asarray(run.images), time.perf_counter() - start, run.outputs


def run_ours(pipeline: Pipeline, case: Case, images) -> tuple[np.ndarray, dict[str, float], dict]:
    outputs: dict = {}
    hooks = StepHooks(on_model_output=lambda step, branch, out: outputs.__setitem__((step, branch), out.clone()))
    stages: dict[str, float] = {}

    def timed(name, call):
        sync()
        start = time.perf_counter()
        value = call()
        sync()
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return value

    resolved = pipeline.resolve(case.options, images)
    job = timed("encode", lambda: pipeline.job_text(resolved, images))
    if images:
        job = timed("vae_encode", lambda: pipeline.job_condition(job, images))
    latents = timed("denoise", lambda: pipeline.denoiser.run(job, hooks))
    array = timed("decode", lambda: to_float_array(pipeline.vae.decode(latents, resolved.width, resolved.height)))
    stages["total"] = sum(stages.values())
    return array, stages, outputs


def cosines(ours: dict, theirs: dict, family: str = "") -> list[float]:
    result = []
    for key, out in sorted(ours.items()):
        ref = theirs[key]
        if ref.dim() == 3:  # Qwen: condition tokens after the noisy ones; 2.1: the prefix before the target
            ref = ref[:, -out.shape[1] :] if family == "qwen-image-2.1" else ref[:, : out.shape[1]]
        result.append(cosine(out, ref))
    return result


def profile_steps(pipeline: Pipeline, case: Case, images, rows: int = 25) -> None:
    """Kernel time of a 2-step run on the fast path, graphs off so each kernel shows (compiled code stays)."""
    from torch.profiler import ProfilerActivity, profile

    short = dataclasses.replace(case, options=dataclasses.replace(case.options, steps=2))
    graphs = pipeline.denoiser.graphs
    graphs.enabled = False  # this stage's cache only: nothing else in the process changes
    try:
        run_ours(pipeline, short, images)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_ours(pipeline, short, images)
    finally:
        graphs.enabled = True
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90), flush=True)


def bench_workload(name: str, work: Workload, modules: dict | None, args) -> dict:
    smoke = modules is None
    tiny = tiny_checkpoint_cached(work.family, work.variant)
    folder = open_model_folder(tiny)
    size, steps = (SMOKE_SIZE, SMOKE_STEPS) if smoke else (work.size, work.steps)
    options = RequestOptions(
        PROMPT,
        negative_prompt=work.negative,
        width=size,
        height=size,
        steps=steps,
        guidance_scale=work.guidance,
        seed=42,
    )
    case = Case(name, work.family, options, work.variant, ((size, size),) * work.input_images)
    images = case.images()
    dtype, device = ("float32", "cpu") if smoke else ("bfloat16", "cuda")
    overrides = {}
    if modules is not None:
        overrides = {k: v for k, v in modules.items() if k != "processors"}
        if work.family.startswith("qwen-image-edit"):
            overrides["processor"] = widen_vision_processor(folder)
    diffusers_pipe = DiffusionPipeline.from_pretrained(tiny, **overrides)
    if smoke:
        overrides = {
            "transformer": diffusers_pipe.transformer,
            "text_encoder": diffusers_pipe.text_encoder,
            "vae": diffusers_pipe.vae,
        }
    diffusers_pipe.set_progress_bar_config(disable=True)
    # diffusers' own processors, captured before any of our stages replaced them on this transformer
    processors = modules["processors"] if modules is not None else Processors(diffusers_pipe.transformer)
    shared = folder.with_modules(overrides)
    compile = "off" if smoke else "on"
    reference = Pipeline(shared, dtype, device, kernels="reference")
    fast = Pipeline(shared, dtype, device, kernels="fast", compile=compile)
    processors.capture_ours()

    # First requests: diffusers warms up on a 2-step run; ours compiles and captures on the real shape.
    processors.use("diffusers")
    run_diffusers(diffusers_pipe, dataclasses.replace(case, options=dataclasses.replace(options, steps=2)), images)
    processors.use("ours")
    start = time.perf_counter()
    run_ours(fast, case, images)
    first_request_s = time.perf_counter() - start
    captures = fast.denoiser.graphs.captures

    diffusers_s, ours_runs = [], []
    for _ in range(args.runs):
        processors.use("diffusers")
        theirs, seconds, their_outputs = run_diffusers(diffusers_pipe, case, images)
        diffusers_s.append(seconds)
        processors.use("ours")
        ours, stages, our_outputs = run_ours(fast, case, images)
        ours_runs.append(stages)
    recaptures = fast.denoiser.graphs.captures - captures

    # `--kernels reference` against diffusers, bitwise, on a short run of the same shape.
    check = dataclasses.replace(case, options=dataclasses.replace(options, steps=3))
    processors.use("diffusers")
    theirs_short, _, _ = run_diffusers(diffusers_pipe, check, images)
    processors.use("ours")
    ours_short, _, _ = run_ours(reference, check, images)

    steps_cos = cosines(our_outputs, their_outputs, work.family)
    totals = [r["total"] for r in ours_runs]
    report = {
        "workload": name,
        "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "diffusers_s": statistics.median(diffusers_s),
        "ours_s": statistics.median(totals),
        "speedup": statistics.median(diffusers_s) / statistics.median(totals),
        "ours_runs_s": totals,
        "diffusers_runs_s": diffusers_s,
        "stages_s": {k: statistics.median(r[k] for r in ours_runs) for k in ours_runs[0]},
        "first_request_s": first_request_s,
        "recaptures_after_first": recaptures,
        "psnr_db": psnr(ours, theirs),
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - theirs).max()),
        "min_step_cosine": min(steps_cos),
        "reference_max_abs_diff": float(np.abs(ours_short.astype(np.float64) - theirs_short).max()),
        "finite": bool(np.isfinite(ours).all() and np.isfinite(theirs).all()),
        "image_std": float(theirs.std()),
    }
    if device == "cuda":
        report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["attention"] = attention_choices()
    emit(**report)
    if name in args.profile.split(",") and not smoke:
        profile_steps(fast, case, images)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each pipeline, alternating")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU, float32")
    parser.add_argument("--profile", default="", help="comma-separated workloads to profile (a 2-step kernel table)")
    args = parser.parse_args()
    configure_compiler()  # start-up, as `imagegen serve`
    torch.set_grad_enabled(False)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU: use --smoke")
    names = [n for n in args.workloads.split(",") if n]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    reports = []
    built: dict[str, dict] = {}
    for name in names:
        work = WORKLOADS[name]
        group = {"qwen-image-2.1": "qwen-image-2.1"}.get(
            work.family, "qwen" if work.family.startswith("qwen") else "z-image"
        )
        modules = None
        if not args.smoke:
            if group not in built:
                built.clear()
                torch.cuda.empty_cache()
                source = {"qwen": "qwen-image-edit-plus"}.get(group, group)
                folder = open_model_folder(tiny_checkpoint_cached(source))
                built[group] = full_size_modules(work.family, folder)
            modules = built[group]
        emit(starting=name, at=time.strftime("%H:%M:%S"))
        try:
            reports.append(bench_workload(name, work, modules, args))
        except Exception as exc:  # noqa: BLE001 - report the failure and go on to the next workload
            emit(workload=name, error=f"{type(exc).__name__}: {exc}"[:2000])
            if args.smoke:
                raise
    print(
        "\n| workload | diffusers (s) | ours (s) | speedup | first request (s) | PSNR (dB) | min step cosine | "
        "reference max diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r['workload']} | {r['diffusers_s']:.3f} | {r['ours_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['first_request_s']:.2f} | {r['psnr_db']:.1f} | {r['min_step_cosine']:.6f} | "
            f"{r['reference_max_abs_diff']:.3g} |"
        )


if __name__ == "__main__":
    main()
