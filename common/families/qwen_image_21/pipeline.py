"""Qwen-Image-2.1's stages, in the order diffusers' `QwenImage21Pipeline.__call__` runs them: encode the prompt,
prepare the latents and the schedule, the one denoise loop (text-to-image). The VAE decode is in `vae`, the facts
in the package (`imagegen.common.families.qwen_image_21`), the DiT forward in `dit`.

Read next to diffusers 0.42.1 `pipelines/qwenimage21/pipeline_qwenimage21.py`, which this module reproduces:

* encode: the raw t2i template through `Qwen3VLProcessor` (left padding), the last decoder layer's output
  *before* the final RMSNorm (the pipeline neutralises the norm with a forward hook; so do we), the system
  turn's `_drop_idx` tokens dropped (counted with the processor's own chat template, as the pipeline does);
* prepare: noise `[K, 1, 64, h, w]` in the model dtype from a CPU generator, flattened to `[K, h*w, 64]`;
  sigmas `linspace(1, 1/N, N)` or the checkpoint's `sample_sigmas` (Turbo), shifted by `mu` of `h*w`;
* denoise: our block-causal DiT (`dit.QwenImage21DiT`) with the prefix KV cache filled at step 0 ("extract")
  and read later ("cached"), one cache per CFG branch; timestep `t` expanded to the batch and rounded to the
  model dtype before `/ 1000`; CFG `neg + s (pos - neg)` in the model dtype (no norm rescale in 2.1);

Under sequence parallelism only the target tokens are sharded; the prefix (the prompt) is replicated and
attended once (`dit.attend_prefixed`).
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.common.checkpoint import ModelFolder
from imagegen.common.denoise import DenoiseJob, DenoiseStage, StepHooks, branch_names, member_velocities, run_batch_loop
from imagegen.common.errors import InvalidArgument
from imagegen.common.families import qwen_image_21 as facts
from imagegen.common.families.qwen_image_21.dit import (
    NEGATIVE_POSITIONS,
    Qwen21Sequence,
    QwenImage21DiT,
    layout_for,
)
from imagegen.common.latents import initial_noise
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule, make_schedule
from imagegen.common.sharding import Sharding
from imagegen.common.stage_settings import StageSettings
from imagegen.common.text import encoder_trunk, ensure_fp32_rotary, take_masked
from imagegen.common.validation import ModelInputs
from imagegen.common.warmup import warmup_options


# ------------------------------------------------------------------------------------------------------ encode
def system_tokens(processor) -> int:
    """`_drop_idx`: the system turn's token count under the processor's own chat template."""
    message = [{"role": "system", "content": [{"type": "text", "text": facts.SYSTEM_PROMPT}]}]
    return len(processor.apply_chat_template(message, tokenize=True, return_dict=False)[0])


class Qwen21TextEncoder:
    """Prompt -> embeddings `[L, D]`, as `_get_qwen_prompt_embeds` builds them for one text-to-image prompt."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self.model = folder.load("text_encoder", dtype, device)
        ensure_fp32_rotary(self.model)
        self.processor = folder.load("processor")
        self.device = torch.device(device)
        self.dtype = self.model.dtype
        self.drop_tokens = system_tokens(self.processor)

    @torch.no_grad()
    def encode(self, prompt: str, images: list, max_sequence_length: int) -> torch.Tensor:
        if images:
            raise InvalidArgument("images", f"{facts.NAME} is served for text-to-image only")
        for token in (self.processor.image_token, getattr(self.processor, "video_token", None)):
            if token and token in prompt:
                # A vision slot without an image: the processor (and the DiT) would look for one.
                raise InvalidArgument("prompt", f"must not contain {token} in text-to-image")
        text = facts.t2i_prompt(prompt)
        inputs = self.processor(text=[text], padding=True, padding_side="left", return_tensors="pt").to(self.device)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        trunk = encoder_trunk(self.model)
        text_model = getattr(trunk, "language_model", trunk)
        # The DiT was trained on the last layer's output before the final norm: the hook returns the norm's input.
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            hidden = trunk(**kwargs, output_hidden_states=True, use_cache=False).hidden_states[-1]
        finally:
            handle.remove()
        mask = inputs["attention_mask"][0]
        return take_masked(hidden[0], mask)[self.drop_tokens :].to(self.dtype)


# ----------------------------------------------------------------------------------------------------- prepare
def noise_for(seed: int, num_images: int, width: int, height: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's draw `[K, 1, 64, h, w]` from a CPU generator, flattened to tokens `[K, h*w, 64]`."""
    rows, cols = facts.latent_grid(width, height)
    noise = initial_noise(seed, (num_images, 1, facts.LATENT_CHANNELS, rows, cols), dtype)
    return noise.view(num_images, facts.LATENT_CHANNELS, rows * cols).transpose(1, 2)


def schedule_for(
    scheduler_config: dict, steps: int, width: int, height: int, sample_sigmas: list[float] | None = None
) -> Schedule:
    """The checkpoint's grid (Turbo) or `linspace(1, 1/N, N)`, through the scheduler with `mu` of `h*w`."""
    rows, cols = facts.latent_grid(width, height)
    sigmas = sample_sigmas if sample_sigmas is not None else np.linspace(1.0, 1 / steps, steps)
    return make_schedule(scheduler_config, sigmas, rows * cols)


def text_sequence(text_len: int, width: int, height: int) -> Qwen21Sequence:
    """A text-to-image branch: `text_len` prompt tokens (no vision slots), then the target image."""
    return Qwen21Sequence(torch.zeros(text_len, dtype=torch.bool), (), facts.target_shape(width, height))


def true_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """2.1's guidance: `neg + s (pos - neg)` in the model dtype, without Qwen-Image's norm rescale."""
    return neg + scale * (pos - neg)


# ------------------------------------------------------------------------------------------------------ denoise
class Qwen21Denoiser(DenoiseStage):
    """The denoise stage: initial noise -> final latent tokens, with true CFG when the job has a negative.

    Each member of a batch runs its own forwards (its prompt length fixes its prefix, and the block-causal prefix
    cannot be padded without a mask); they share the loop, so stops and progress stay per member. Under sequence
    parallelism each rank holds a contiguous block of the target tokens through the loop (CFG and the Euler step
    are per token), gathered once at the end; with CFG-parallel ranks each computes one branch and they swap.
    """

    dit_class = QwenImage21DiT
    fast_class = QwenImage21DiT  # the fast path is not written yet: both paths run the reference forward
    lora_family = facts.NAME

    sample_sigmas: list[float] | None = None  # Turbo's stored grid (a stage built `from_transformer` has none)

    def __init__(
        self,
        folder: ModelFolder,
        dtype: torch.dtype,
        device: torch.device | str,
        settings: StageSettings = StageSettings(),
    ) -> None:
        super().__init__(folder, dtype, device, settings)
        self.sample_sigmas = facts.sample_sigmas(folder.index)

    def uses_fast_path(self, sharding: Sharding) -> bool:
        return False

    def schedule(self, options: ResolvedOptions) -> Schedule:
        return schedule_for(self.scheduler_config, options.steps, options.width, options.height, self.sample_sigmas)

    def denoise(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        first = jobs[0].options
        device, dtype = self.device, self.dtype
        schedule = self.schedule(first).to(device)
        tokens = facts.latent_grid(first.width, first.height)
        plan = sharding.plan((tokens[0] * tokens[1],))
        backend = sharding.attention(plan)
        noisy_rows = plan.segment_rows(0).to(device)
        latent_lengths = [end - start for start, end in (plan.segment_range(0, r) for r in range(plan.world))]
        names = branch_names(jobs[0].negative_embeds is not None)
        local = sharding.branches(names)
        start, end = plan.segment_range(0)
        noises = [noise_for(o.seed, o.num_images, o.width, o.height, dtype) for o in (j.options for j in jobs)]
        counts = [noise.shape[0] for noise in noises]
        latents = [noise[:, start:end].to(device) for noise in noises]
        padded = [torch.zeros(n.shape[0], plan.local_len, n.shape[2], dtype=dtype, device=device) for n in noises]

        def branch(job: DenoiseJob, name: str, rows: int):
            """One CFG branch of one member: its text, sequence and prefix cache (filled at its first step)."""
            embeds = job.embeds(name).to(device, dtype)
            sequence = text_sequence(embeds.shape[0], first.width, first.height)
            text = embeds[None].expand(rows, -1, -1)
            return text, sequence, self.dit.new_cache()

        branches = [{name: branch(job, name, count) for name in local} for job, count in zip(jobs, counts, strict=True)]
        started: set[tuple[int, str]] = set()

        def forward(member: int, name: str, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            text, sequence, cache = branches[member][name]
            mode = "cached" if (member, name) in started else "extract"
            started.add((member, name))
            layout = layout_for(self.dit.transformer, sequence, backend, mode, cache, target_rows=plan.local_index)
            if mode == "cached":
                return self.dit(model_input, timestep, layout)
            return self.dit(model_input, timestep, layout, text, sequence)

        def gather(tokens: torch.Tensor) -> torch.Tensor:
            return sharding.gather(tokens, latent_lengths)

        def combine(member: int, outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            if len(outputs) == 1:
                return outputs[0]
            return true_cfg(outputs[0], outputs[1], jobs[member].options.guidance_scale)

        def predict(active: tuple[int, ...], member_latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            velocities = []
            for member, lat in zip(active, member_latents, strict=True):
                model_input = padded[member].index_copy(1, noisy_rows, lat)
                # One timestep per row, as the pipeline expands it to the batch.
                timestep = schedule.timesteps[step].expand(lat.shape[0]).to(dtype) / 1000
                outputs = {
                    name: forward(member, name, model_input, timestep).index_select(1, noisy_rows) for name in local
                }
                mine = sharding.exchange(outputs, names)
                velocities += member_velocities((member,), counts, names, mine, hooks, step, combine, gather)
            return velocities

        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        return [r if isinstance(r, BaseException) else gather(r) for r in results]


def input_limits(family: str, stage: Qwen21Denoiser, job: DenoiseJob) -> ModelInputs:
    """What the loaded denoiser accepts: the encoder width `txt_in` projects from, and the prompt tokens whose
    RoPE rows exist (text k sits at position k on every axis and the target frame at the prompt's length, so
    the longest prompt is one short of the tables' non-negative positions). Text-to-image only: no condition."""
    transformer = stage.dit.transformer
    positive = transformer.pos_embed.freqs[0].shape[0] - NEGATIVE_POSITIONS
    return ModelInputs(transformer.config.context_in_dim, positive - 1, None)


# ----------------------------------------------------------------------------------------------------- warm-up
def warmup_jobs(family: str, width: int, height: int, config: dict) -> list[DenoiseJob]:
    """Two-step jobs for `imagegen.common.warmup`: CFG with prompts of different lengths, and no CFG."""
    generator = torch.Generator().manual_seed(0)
    dim = config.get("context_in_dim", 4096)

    def embeds(length: int) -> torch.Tensor:
        return torch.randn(length, dim, generator=generator) * 0.1

    return [
        DenoiseJob(warmup_options(family, width, height, " ", guidance_scale=4.0), embeds(24), embeds(11)),
        DenoiseJob(warmup_options(family, width, height, None, guidance_scale=4.0), embeds(24)),
    ]
