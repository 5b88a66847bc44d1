"""Qwen-Image's stages, in the order diffusers' `QwenImagePipeline.__call__` runs them: encode the prompt
(and edit images), prepare the latents and the schedule, the denoise loop with true CFG. The VAE (edit images
in, images out) is in `vae`, the facts in the package (`imagegen.common.families.qwen_image`), the DiT
forwards in `dit` and `dit_fast`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from imagegen.common.attention import AttentionLayout
from imagegen.common.batching import row_lengths, stack_padded
from imagegen.common.cfg import qwen_true_cfg
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.denoise import (
    DenoiseJob,
    DenoiseStage,
    PerActiveSet,
    StepHooks,
    branch_names,
    member_velocities,
    run_batch_loop,
)
from imagegen.common.families.qwen_image import (
    LATENT_CHANNELS,
    VARIANTS,
    edit_geometry,
    latent_grid,
    max_condition_tokens,
    template,
    token_grid,
)
from imagegen.common.families.qwen_image.dit import QwenDiT, qwen_rotary
from imagegen.common.families.qwen_image.dit_fast import QwenFastDiT, QwenFastInputs
from imagegen.common.families.qwen_image.vae import image_processor
from imagegen.common.graphs import maybe_graphed
from imagegen.common.kernels import pad_rows, rotary_tables
from imagegen.common.latents import initial_noise, patchify
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule, make_schedule
from imagegen.common.sharding import SequencePlan, Sharding
from imagegen.common.text import encoder_trunk, ensure_fp32_rotary, take_masked
from imagegen.common.validation import ModelInputs
from imagegen.common.warmup import warmup_options


# ------------------------------------------------------------------------------------------------------ encode
class QwenTextEncoder:
    """Prompt (+ edit images) -> embeddings `[L, D]`, as `_get_qwen_prompt_embeds` + `encode_prompt` build them."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self.variant = VARIANTS[folder.family]
        self.model = folder.load("text_encoder", dtype, device)
        ensure_fp32_rotary(self.model)
        self.tokenizer = folder.load("processor" if self.variant.is_edit else "tokenizer")
        self.device = torch.device(device)
        self.dtype = self.model.dtype

    def vl_images(self, images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
        sizes = edit_geometry(self.variant, [im.size for im in images]).vl_sizes
        return [image_processor.resize(im, h, w) for im, (w, h) in zip(images, sizes, strict=True)]

    @torch.no_grad()
    def encode(self, prompt: str, images: list[PIL.Image.Image], max_sequence_length: int) -> torch.Tensor:
        text = template(self.variant.system, self.variant.user_text(prompt, len(images)))
        if self.variant.is_edit:
            inputs = self.tokenizer(text=[text], images=self.vl_images(images), padding=True, return_tensors="pt")
        else:
            max_length = 1024 + self.variant.drop_tokens
            inputs = self.tokenizer([text], max_length=max_length, padding=True, truncation=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        hidden = encoder_trunk(self.model)(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-1]
        embeds = take_masked(hidden[0], inputs["attention_mask"][0])[self.variant.drop_tokens :]
        if self.variant.truncate_embeddings:
            embeds = embeds[:max_sequence_length]
        return embeds.to(self.dtype)


# ----------------------------------------------------------------------------------------------------- prepare
def noise_for(seed: int, num_images: int, width: int, height: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's draw: `[K, 1, 16, h, w]` in the model dtype from a CPU generator, packed to `[K, S, 64]`."""
    rows, cols = latent_grid(width, height)
    noise = initial_noise(seed, (num_images, 1, LATENT_CHANNELS, rows, cols), dtype)
    return patchify(noise[:, 0], channel_last=False)


def schedule_for(scheduler_config: dict, steps: int, width: int, height: int) -> Schedule:
    rows, cols = latent_grid(width, height)
    return make_schedule(scheduler_config, np.linspace(1.0, 1 / steps, steps), (rows // 2) * (cols // 2))


@dataclass(frozen=True)
class QwenBatch:
    """A checked batch as both kernel paths see it: each member's noise and the shared schedule and grids."""

    jobs: list[DenoiseJob]
    noises: list[torch.Tensor]  # [K_i, S0, 64] packed noise per member, on the CPU
    schedule: Schedule
    img_shapes: list[tuple[int, int, int]]  # the noisy image's token grid, then each edit image's
    names: list[str]  # the CFG branches every member runs

    @property
    def counts(self) -> list[int]:
        return [noise.shape[0] for noise in self.noises]


# ------------------------------------------------------------------------------------------------------ denoise
class QwenDenoiser(DenoiseStage):
    """The denoise stage: initial noise -> final packed latents, with true CFG when the job has a negative.

    Under sequence parallelism (`sharding`) each rank holds a contiguous block of the noisy tokens and of each
    edit image's tokens; the latents stay sharded through the loop (CFG and the Euler step are per token) and
    are gathered once at the end. With CFG-parallel ranks each computes one branch and they swap outputs.
    """

    dit_class = QwenDiT
    fast_class = QwenFastDiT
    lora_family = "qwen-image"

    def denoise(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        first, opts = jobs[0], jobs[0].options
        noises = [noise_for(j.options.seed, j.options.num_images, opts.width, opts.height, self.dtype) for j in jobs]
        schedule = schedule_for(self.scheduler_config, opts.steps, opts.width, opts.height).to(self.device)
        img_shapes = [token_grid(opts.width, opts.height), *first.condition_shapes]
        batch = QwenBatch(jobs, noises, schedule, img_shapes, branch_names(first.negative_embeds is not None))
        plan = sharding.plan(tuple(math.prod(shape) for shape in img_shapes))
        start, end = plan.segment_range(0)
        latents = [noise[:, start:end].to(self.device) for noise in noises]
        lengths = [end - start for start, end in (plan.segment_range(0, r) for r in range(plan.world))]
        if self.uses_fast_path(sharding):
            branch_outputs, compiled = self._fast_outputs(batch, sharding)
        else:
            branch_outputs, compiled = self._reference_outputs(batch, plan, sharding), False

        def gather(tokens: torch.Tensor) -> torch.Tensor:
            return sharding.gather(tokens, lengths)

        def combine(member: int, outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            if len(outputs) == 1:
                return outputs[0]
            return qwen_true_cfg(outputs[0], outputs[1], jobs[member].options.guidance_scale)

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            outputs = sharding.exchange(branch_outputs(active, latents, step), batch.names)
            return member_velocities(active, batch.counts, batch.names, outputs, hooks, step, combine, gather)

        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        if compiled:
            self.compiled_forward_ran()
        return [r if isinstance(r, BaseException) else gather(r) for r in results]

    def _reference_outputs(self, batch: QwenBatch, plan: SequencePlan, sharding: Sharding):
        """Every member's rows of one branch in one forward (members in order, each its num_images rows)."""
        jobs, counts = batch.jobs, batch.counts
        noisy_rows = plan.segment_rows(0).to(self.device)

        # The local DiT input is this rank's rows of [noise, edit images]; the noisy rows change every step.
        def local_input(job: DenoiseJob, noise: torch.Tensor) -> torch.Tensor:
            if job.condition_latents is None:
                return plan.take_local(noise).to(self.device)
            condition = job.condition_latents.to(noise.device, self.dtype).expand(noise.shape[0], -1, -1)
            return plan.take_local(torch.cat([noise, condition], dim=1)).to(self.device)

        inputs = [local_input(job, noise) for job, noise in zip(jobs, batch.noises, strict=True)]
        modulate_index = None
        if self.dit.zero_cond_t:
            modulate_index = (plan.local_segment > 0).int().to(self.device)[None]
        backend = sharding.attention(plan)

        def branch_forward(text: torch.Tensor, layout: AttentionLayout, index: torch.Tensor | None):
            def forward(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                return self.dit(model_input, text, timestep, layout, index).index_select(1, noisy_rows)

            return maybe_graphed(forward, self.device, self.settings.cuda_graphs)

        def setup(active: tuple[int, ...]):
            """The active members' stacked inputs and one forward per local branch."""
            member_counts = [counts[m] for m in active]
            index = None if modulate_index is None else modulate_index.expand(sum(member_counts), -1)
            forwards = {}
            for name in sharding.branches(batch.names):
                embeds = [jobs[m].embeds(name) for m in active]
                lengths = [e.shape[0] for e in embeds]
                longest = max(lengths)
                text = stack_padded([e.to(self.device, self.dtype) for e in embeds], member_counts, longest)
                image_rotary, text_rotary = qwen_rotary(self.dit.transformer, batch.img_shapes, longest)
                layout = AttentionLayout(
                    backend,
                    image_rotary.index(plan.local_index).to(self.device),
                    text_rotary.to(self.device),
                    replicated_lengths=row_lengths(lengths, member_counts),
                )
                forwards[name] = branch_forward(text, layout, index)
            return torch.cat([inputs[m] for m in active]), forwards

        setups = PerActiveSet(setup)

        def outputs(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
            stacked_input, forwards = setups(active)
            batched = torch.cat(latents)
            # One timestep row for all: the time embedding and every block's modulation are computed once and
            # broadcast, so no row's arithmetic depends on how many rows share the forward.
            timestep = batch.schedule.timesteps[step : step + 1].to(batched.dtype) / 1000
            model_input = stacked_input.index_copy(1, noisy_rows, batched)
            return {name: forward(model_input, timestep) for name, forward in forwards.items()}

        return outputs

    def _fast_outputs(self, batch: QwenBatch, sharding: Sharding):
        """Every local CFG branch of every member in one batched forward (branch-major rows, members in order
        within a branch), replayed from `self.graphs`; and whether it runs compiled."""
        jobs, counts, device, dtype = batch.jobs, batch.counts, self.device, self.dtype
        local = sharding.branches(batch.names)
        segment_sizes = torch.tensor([math.prod(shape) for shape in batch.img_shapes])
        segment_of_row = torch.repeat_interleave(torch.arange(len(batch.img_shapes)), segment_sizes)
        compile = self.compile_for(jobs[0].options.steps * len(local))
        timesteps = batch.schedule.timesteps.to(dtype) / 1000
        img_mods, txt_mods = self.fast.modulations(timesteps)

        def setup(active: tuple[int, ...]):
            row_embeds = [jobs[m].embeds(name) for name in local for m in active for _ in range(counts[m])]
            lengths = tuple(e.shape[0] for e in row_embeds)
            longest = max(lengths)
            image_rotary, text_rotary = qwen_rotary(self.fast.transformer, batch.img_shapes, longest)
            rows = len(row_embeds)
            if jobs[0].condition_latents is None:
                condition = torch.zeros(rows, 0, batch.noises[0].shape[2], dtype=dtype, device=device)
            elif len(active) == 1:
                condition = jobs[active[0]].condition_latents.to(device, dtype).expand(rows, -1, -1)
            else:
                parts = [jobs[m].condition_latents.to(device, dtype).expand(counts[m], -1, -1) for m in active]
                condition = torch.cat(parts * len(local))
            inputs = QwenFastInputs(
                pad_rows([e.to(device, dtype) for e in row_embeds], longest),
                condition,
                *rotary_tables(image_rotary.freqs, device),
                *rotary_tables(text_rotary.freqs, device),
                (segment_of_row > 0).int().to(device),
            )

            def forward(latents: torch.Tensor, timestep: torch.Tensor, img_mod, txt_mod, *tensors) -> torch.Tensor:
                return self.fast(latents, timestep, img_mod, txt_mod, QwenFastInputs(*tensors), lengths, compile)

            return inputs, forward, ("qwen", lengths, compile)

        setups = PerActiveSet(setup)

        def outputs(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
            inputs, forward, key = setups(active)
            batched = torch.cat(latents).repeat(len(local), 1, 1)
            step_args = (timesteps[step : step + 1], img_mods[step], txt_mods[step])
            out = self.graphs.run(key, forward, batched, *step_args, *inputs.tensors())
            return dict(zip(local, out.chunk(len(local)), strict=True))

        return outputs, compile


def input_limits(family: str, stage: QwenDenoiser, job: DenoiseJob) -> ModelInputs:
    """What the loaded denoiser accepts for `job`: the embedding width, the text tokens whose RoPE rows exist
    next to its image grids, and (edits) the condition channels and one edit image's most tokens."""
    transformer = stage.dit.transformer
    config, opts = transformer.config, job.options
    # Text RoPE rows continue after the largest half side of any image grid (the noisy one first).
    grids = [token_grid(opts.width, opts.height), *job.condition_shapes]
    start = max(max(rows // 2, cols // 2) for _, rows, cols in grids)
    table = transformer.pos_embed.pos_freqs.shape[0]
    if not VARIANTS[family].is_edit:
        return ModelInputs(config.joint_attention_dim, table - start, None)
    condition_tokens = max_condition_tokens(family)
    return ModelInputs(config.joint_attention_dim, table - start, config.in_channels, condition_tokens, table)


# ----------------------------------------------------------------------------------------------------- warm-up
def warmup_jobs(family: str, width: int, height: int, config: dict) -> list[DenoiseJob]:
    """Two-step jobs that trace every shape class a request of this size meets (`imagegen.common.warmup`): CFG
    with prompts of different lengths, and no CFG; edits carry one condition image of the output's size."""
    generator = torch.Generator().manual_seed(0)
    dim = config.get("joint_attention_dim", 3584)

    def embeds(length: int) -> torch.Tensor:
        return torch.randn(length, dim, generator=generator) * 0.1

    condition, shapes = None, []
    if VARIANTS[family].is_edit:
        shapes = [token_grid(width, height)]
        condition = torch.randn(1, math.prod(shapes[0]), config.get("in_channels", 64), generator=generator)

    def options(negative: str | None) -> ResolvedOptions:
        return warmup_options(family, width, height, negative, guidance_scale=4.0, num_input_images=len(shapes))

    return [
        DenoiseJob(options(" "), embeds(24), embeds(11), condition, shapes),
        DenoiseJob(options(None), embeds(24), None, condition, shapes),
    ]
