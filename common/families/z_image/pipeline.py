"""Z-Image's stages, in the order diffusers' `ZImagePipeline.__call__` runs them: encode the prompt, prepare
the latents and the schedule, the denoise loop with CFG (norm clip, truncation). The VAE decode is in `vae`,
the facts in the package (`imagegen.common.families.z_image`), the DiT forwards in `dit` and `dit_fast`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagegen.common.attention import AttentionBackend
from imagegen.common.call_rows import CallRows
from imagegen.common.cfg import z_image_cfg
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
from imagegen.common.families.z_image import LATENT_CHANNELS, NAME, latent_grid, max_text_tokens, padded_length
from imagegen.common.families.z_image.dit import ImageSlots, ZImageBranch, ZImageDiT, stack_branches
from imagegen.common.families.z_image.dit_fast import ZImageFastDiT, ZImageFastInputs
from imagegen.common.graphs import maybe_graphed
from imagegen.common.kernels import pad_rows, rotary_tables
from imagegen.common.latents import initial_noise, patchify, unpatchify
from imagegen.common.schedule import Schedule, make_schedule
from imagegen.common.sharding import Sharding
from imagegen.common.text import encoder_trunk, ensure_fp32_rotary, take_masked
from imagegen.common.validation import ModelInputs
from imagegen.common.warmup import warmup_options


# ------------------------------------------------------------------------------------------------------ encode
class ZImageTextEncoder:
    """Prompt -> caption features `[L, D]` (only the attended tokens), as `ZImagePipeline._encode_prompt`."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self.model = folder.load("text_encoder", dtype, device)
        ensure_fp32_rotary(self.model)
        self.tokenizer = folder.load("tokenizer")
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompt: str, images: list, max_sequence_length: int) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        inputs = self.tokenizer(
            [text], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        mask = inputs.attention_mask.to(self.device).bool()
        hidden = encoder_trunk(self.model)(
            input_ids=inputs.input_ids.to(self.device),
            attention_mask=mask,
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-2]
        return take_masked(hidden[0], mask[0])


# ----------------------------------------------------------------------------------------------------- prepare
def noise_for(seed: int, num_images: int, width: int, height: int) -> torch.Tensor:
    """The pipeline's draw: `[K, 16, h, w]` float32 from a CPU generator."""
    rows, cols = latent_grid(width, height)
    return initial_noise(seed, (num_images, LATENT_CHANNELS, rows, cols), torch.float32)


def schedule_for(scheduler_config: dict, steps: int, width: int, height: int) -> Schedule:
    rows, cols = latent_grid(width, height)
    base = torch.linspace(1.0, 1 / steps, steps).tolist()  # a float32 grid, as get_default_z_image_sigmas
    return make_schedule(scheduler_config, base, (rows // 2) * (cols // 2))


def guidance_per_step(schedule: Schedule, scale: float, truncation: float) -> list[float]:
    """The CFG scale of each step: 0 where `cfg_truncation` cuts it off ((1000 - t) / 1000 > truncation)."""
    if truncation is None or float(truncation) > 1:
        return [scale] * schedule.num_steps
    t_norms = ((1000 - schedule.timesteps.float()) / 1000).tolist()
    return [0.0 if t_norm > truncation else scale for t_norm in t_norms]


@dataclass(frozen=True)
class ZImageBatch:
    """A checked batch as both kernel paths see it: each member's refined captions and CFG scales."""

    jobs: list[DenoiseJob]
    counts: list[int]  # images per member
    branches: list[dict[str, ZImageBranch]]  # per member: its refined caption of each branch it may run
    scales: list[list[float] | None]  # per member: its CFG scale of each step (None: no CFG)
    names: list[str]  # the CFG branches a step with CFG runs
    slots: ImageSlots

    def step_names(self, member: int, step: int) -> list[str]:
        """The branches step `step` runs: both while CFG applies, the positive one where truncation cut it."""
        scales = self.scales[member]
        return self.names if scales is not None and scales[step] > 0 else ["positive"]


# ------------------------------------------------------------------------------------------------------ denoise
class ZImageDenoiser(DenoiseStage):
    """The denoise stage: float32 noise -> float32 final latents `[K, 16, h, w]`.

    Latents are held as 2x2 patch tokens for the whole loop (the Euler step is elementwise, so the layout is
    free); under sequence parallelism each rank holds a contiguous block of them and CFG's norm clip sums
    across ranks.
    """

    dit_class = ZImageDiT
    fast_class = ZImageFastDiT
    lora_family = NAME

    def denoise(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        opts = jobs[0].options
        noises = [noise_for(j.options.seed, j.options.num_images, opts.width, opts.height) for j in jobs]
        cpu_schedule = schedule_for(self.scheduler_config, opts.steps, opts.width, opts.height)
        schedule = cpu_schedule.to(self.device)
        height, width = noises[0].shape[2:]
        rows, cols = height // 2, width // 2
        slots = ImageSlots(sharding.plan((padded_length(rows * cols),)), rows * cols, self.device)
        start = slots.plan.segment_range(0)[0]
        latents = [
            patchify(n, channel_last=True)[:, start : start + slots.local_latent].to(self.device) for n in noises
        ]
        lengths = slots.latent_lengths()
        names = branch_names(opts.uses_cfg)
        # Each member's refined captions: the local CFG branches, and the positive one on every rank (steps
        # that truncation leaves to it run it everywhere).
        wanted = {*sharding.branches(names), "positive"}
        branches = [
            {name: self.dit.branch(j.embeds(name).to(self.device, self.dtype), rows, cols, slots) for name in wanted}
            for j in jobs
        ]
        scales = [
            guidance_per_step(cpu_schedule, j.options.guidance_scale, j.options.cfg_truncation)
            if opts.uses_cfg
            else None
            for j in jobs
        ]
        batch = ZImageBatch(jobs, [n.shape[0] for n in noises], branches, scales, names, slots)
        if self.uses_fast_path(sharding):
            branch_outputs, compiled = self._fast_outputs(batch, sharding, opts.steps)
        else:
            branch_outputs, compiled = self._reference_outputs(batch, sharding.attention(slots.plan)), False

        def gather(tokens: torch.Tensor) -> torch.Tensor:
            return sharding.gather(tokens, lengths)

        def full(tokens: torch.Tensor) -> torch.Tensor:
            return unpatchify(gather(tokens), height, width, channel_last=True)

        def combine(member: int, outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            """The Euler step's velocity: the negated prediction, CFG with the member's own scale and clip."""
            if len(outputs) == 1:
                return -outputs[0].float()
            pos, neg = (out.float() for out in outputs)
            return -z_image_cfg(pos, neg, scales[member][step], jobs[member].options.cfg_normalization, gather)

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            # One timestep; each forward row's time embedding and modulations come from the diffusers call
            # of its job alone (`CallRows`), whatever the batch and the CFG layout.
            timestep = (1000 - schedule.timesteps[step : step + 1]) / 1000
            step_names = batch.step_names(active[0], step)  # one batch key: the same for every member
            local = tuple(sharding.branches(step_names))
            outputs = sharding.exchange(branch_outputs(active, latents, timestep, local, step_names), step_names)
            return member_velocities(active, batch.counts, step_names, outputs, hooks, step, combine, full)

        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        if compiled:
            self.compiled_forward_ran()
        return [r if isinstance(r, BaseException) else full(r) for r in results]

    def _reference_outputs(self, batch: ZImageBatch, backend: AttentionBackend):
        """One forward per local branch, every active member's rows in it (members in order)."""

        def branch_forward(active: tuple[int, ...], name: str, step_names: tuple[str, ...]):
            counts = [batch.counts[m] for m in active]
            branch = stack_branches([batch.branches[m][name] for m in active], counts)
            # Each member's timestep rows as its job alone in diffusers: one call over the step's branches.
            rows = CallRows.for_members(counts, (name,), step_names, self.device)

            def forward(tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                return self.dit(tokens, timestep, branch, batch.slots, backend, rows)

            return maybe_graphed(forward, self.device, self.settings.cuda_graphs)

        forwards = PerActiveSet(branch_forward)

        def outputs(active, latents, timestep: torch.Tensor, local: tuple[str, ...], step_names) -> dict:
            model_input = torch.cat(latents).to(self.dtype)
            return {name: forwards(active, name, tuple(step_names))(model_input, timestep) for name in local}

        return outputs

    def _fast_outputs(self, batch: ZImageBatch, sharding: Sharding, steps: int):
        """The local CFG branches of every member at each step in one batched forward (branch-major rows,
        members in order within a branch), replayed from `self.graphs` (steps that `cfg_truncation` leaves to
        the positive branch alone run a forward of their own shape); and whether it runs compiled."""
        device, dtype, counts = self.device, self.dtype, batch.counts
        compile = self.compile_for(sum(len(sharding.branches(batch.step_names(0, s))) for s in range(steps)))

        def batch_inputs(
            active: tuple[int, ...], local: tuple[str, ...], step_names: tuple[str, ...]
        ) -> tuple[ZImageFastInputs, tuple[int, ...], CallRows]:
            row_branches = [batch.branches[m][name] for name in local for m in active for _ in range(counts[m])]
            lengths = tuple(b.caption_tokens.shape[1] for b in row_branches)
            longest = max(lengths)
            caption_rotary = max((b.caption_rotary for b in row_branches), key=len)  # a prefix of the longest
            cap_cos, cap_sin = rotary_tables(caption_rotary.freqs, device)
            image_tables = [rotary_tables(b.image_rotary.freqs, device) for b in row_branches]
            image_cos = torch.stack([c for c, _ in image_tables])
            image_sin = torch.stack([s for _, s in image_tables])
            rows = len(row_branches)
            inputs = ZImageFastInputs(
                pad_rows([b.caption_tokens[0] for b in row_branches], longest),
                image_cos,
                image_sin,
                torch.cat([image_cos, cap_cos.expand(rows, -1, -1)], dim=1),
                torch.cat([image_sin, cap_sin.expand(rows, -1, -1)], dim=1),
                batch.slots.register_rows,
            )
            rows = CallRows.for_members([counts[m] for m in active], local, step_names, device)
            return inputs, lengths, rows

        inputs_for = PerActiveSet(batch_inputs)

        def forward(lengths: tuple[int, ...], rows: CallRows):
            def run(tokens: torch.Tensor, timestep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
                return self.fast(tokens, timestep, ZImageFastInputs(*tensors), lengths, compile, rows)

            return run

        def outputs(active, latents, timestep: torch.Tensor, local: tuple[str, ...], step_names) -> dict:
            inputs, lengths, rows = inputs_for(active, local, tuple(step_names))
            batched = torch.cat(latents).to(dtype).repeat(len(local), 1, 1)
            # The timestep rows are part of the captured graph: the step's branches are in its key.
            key = (NAME, lengths, compile, tuple(step_names))
            out = self.graphs.run(key, forward(lengths, rows), batched, timestep, *inputs.tensors())
            return dict(zip(local, out.chunk(len(local)), strict=True))

        return outputs, compile


def input_limits(family: str, stage: ZImageDenoiser, job: DenoiseJob) -> ModelInputs:
    """What the loaded denoiser accepts: the caption feature width and the caption tokens whose RoPE ids fit."""
    config = stage.dit.transformer.config
    return ModelInputs(config.cap_feat_dim, max_text_tokens(config.axes_lens[0]), None)


# ----------------------------------------------------------------------------------------------------- warm-up
def warmup_jobs(family: str, width: int, height: int, config: dict) -> list[DenoiseJob]:
    """Two-step jobs that trace every shape class a request of this size meets (`imagegen.common.warmup`): CFG
    with captions that pad to different lengths, and no CFG (Turbo)."""
    generator = torch.Generator().manual_seed(0)
    dim = config.get("cap_feat_dim", 2560)

    def embeds(length: int) -> torch.Tensor:
        return torch.randn(length, dim, generator=generator) * 0.1

    return [
        DenoiseJob(warmup_options(family, width, height, "", guidance_scale=4.0), embeds(24), embeds(40)),
        DenoiseJob(warmup_options(family, width, height, None, guidance_scale=0.0), embeds(24)),
    ]
