"""Full-size sequence-parallel / CFG-parallel benchmark on GPUs (random weights, bf16, 1024x1024).

Run under torchrun with 2 processes (one per GPU):

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node=2 bench/sp_gpu.py --family qwen-image --steps 6

For the family it builds the full-size DiT from its default config with random weights on every GPU, then:
* times diffusers' own transformer forward (the one-GPU baseline, same weights, before our processors go in);
* runs our denoise loop with P=1 (rank 0 alone), P=2 (Ulysses over both GPUs) and C=2 (CFG branches on
  separate GPUs), timing every step with CUDA synchronisation in a step hook;
* captures every step's model output of a short run in each mode and prints the cosine against P=1.
Rank 0 prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.compare import cosine
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.families import get_family
from imagegen.common.options import ResolvedOptions
from imagegen.common.parallel.group import ParallelGroup
from imagegen.common.parallel.sharding import GroupSharding
from imagegen.common.sharding import LOCAL

QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "shift_terminal": 0.02,
    "num_train_timesteps": 1000,
}
Z_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": False, "num_train_timesteps": 1000}


# `--smoke`: the same code path with tiny configs, to check the script on the CPU (gloo) before a GPU run.
SMOKE_CONFIGS = {
    "qwen-image": dict(
        num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)
    ),
    "z-image": dict(
        dim=96, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=48, axes_dims=[8, 8, 8]
    ),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_transformer(family: str, device: torch.device, smoke: bool) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    torch.manual_seed(0)  # the same random weights on every rank
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    config = SMOKE_CONFIGS[family] if smoke else {}
    try:
        with torch.device(device):
            cls = QwenImageTransformer2DModel if family == "qwen-image" else ZImageTransformer2DModel
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_job(family: str, steps: int, text_dim: int, size: int) -> DenoiseJob:
    generator = torch.Generator().manual_seed(1)
    # Positive and negative captions of different lengths: the negative branch gets its own RoPE.
    positive = torch.randn(128, text_dim, generator=generator).bfloat16()
    negative = torch.randn(77, text_dim, generator=generator).bfloat16()
    guidance = 4.0 if family == "qwen-image" else 5.0
    options = ResolvedOptions(family, "p", "n", size, size, steps, guidance, 0.0, 1.0, 512, 42, 1)
    return DenoiseJob(options, positive, negative)


def diffusers_step_seconds(family: str, transformer: torch.nn.Module, job: DenoiseJob, repeats: int) -> float:
    """One step of the diffusers pipeline's DiT work: two B=1 calls (Qwen) or one batched call (Z-Image)."""
    device = transformer.device
    side = job.options.width // 16  # tokens per side
    pos, neg = job.prompt_embeds.to(device), job.negative_embeds.to(device)
    if family == "qwen-image":
        latents = torch.randn(1, side * side, 64, device=device, dtype=torch.bfloat16)
        t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)

        def call():
            for text in (pos, neg):
                transformer(latents, text[None], None, t, [[(1, side, side)]], return_dict=False)

    else:
        latents = [torch.randn(16, 1, 2 * side, 2 * side, device=device, dtype=torch.bfloat16) for _ in range(2)]
        t = torch.full((2,), 0.5, device=device)

        def call():
            transformer(latents, t, [pos, neg], return_dict=False)

    return _median_seconds(call, repeats)


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_run(denoiser, job: DenoiseJob, sharding) -> list[float]:
    marks = []

    def on_step(done: int, total: int) -> None:
        sync()
        marks.append(time.perf_counter())

    sync()
    marks.append(time.perf_counter())
    denoiser.run(job, StepHooks(on_step=on_step), sharding)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def captured_run(denoiser, job: DenoiseJob, sharding) -> dict:
    outputs = {}
    hooks = StepHooks(on_model_output=lambda step, branch, out: outputs.__setitem__((step, branch), out.float().cpu()))
    denoiser.run(job, hooks, sharding)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=["qwen-image", "z-image"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accuracy-steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    kind = "cpu" if args.smoke else "cuda"
    torch.set_grad_enabled(False)
    sp_group = ParallelGroup.from_environment(2, False, kind, timeout_s=1200)
    cfg_group = ParallelGroup.from_environment(1, True, kind, timeout_s=1200)
    device = sp_group.device

    transformer = build_transformer(args.family, device, args.smoke)
    text_dim = (
        transformer.config.joint_attention_dim if args.family == "qwen-image" else transformer.config.cap_feat_dim
    )
    job = make_job(args.family, args.steps, text_dim, args.size)
    short = make_job(args.family, args.accuracy_steps, text_dim, args.size)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"family": args.family, "card": card, "torch": torch.__version__}

    if rank == 0:
        report["diffusers_step_s"] = diffusers_step_seconds(args.family, transformer, job, repeats=5)
    dist.barrier()
    family = get_family(args.family)
    scheduler = QWEN_SCHEDULER if args.family == "qwen-image" else Z_SCHEDULER
    denoiser = family.denoiser.from_transformer(transformer, scheduler)

    reference = None
    if rank == 0:
        steps = timed_run(denoiser, job, LOCAL)
        report["p1_step_s"] = statistics.median(steps[1:])
        reference = captured_run(denoiser, short, LOCAL)
    dist.barrier()
    for mode, group in (("p2", sp_group), ("c2", cfg_group)):
        sharding = GroupSharding(group)
        steps = timed_run(denoiser, job, sharding)
        outputs = captured_run(denoiser, short, sharding)
        if rank == 0:
            report[f"{mode}_step_s"] = statistics.median(steps[1:])
            report[f"{mode}_min_cosine"] = min(cosine(outputs[k], reference[k]) for k in reference)
    if rank == 0:
        if device.type == "cuda":
            report["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
