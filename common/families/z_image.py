"""Z-Image and Z-Image-Turbo: every fact specific to this family.

Read next to diffusers 0.42.1 `pipelines/z_image/pipeline_z_image.py` and
`models/transformers/transformer_z_image.py`, which this module reproduces stage by stage:

* encode: the tokenizer's own chat template (`enable_thinking=True`), padded to `max_sequence_length`, the
  second-to-last hidden layer of the Qwen3 encoder, padding tokens removed;
* prepare: noise drawn `[K, 16, h, w]` in float32; sigmas `torch.linspace(1, 1/N, N)` with the scheduler's
  static shift (3 for Turbo);
* denoise: our DiT forward over the diffusers layers with our attention processor. Image tokens (2x2 patches,
  channel fastest) and caption tokens are each padded to a multiple of 32 with learned pad tokens, refined
  separately, then joined `[image, caption]`. RoPE ids: caption k -> (1 + k, 0, 0), image (y, x) ->
  (Lp + 1, y, x) with Lp the branch's own padded caption length, pads (0, 0, 0). The branches run as
  separate forwards; CFG `pos + g (pos - neg)` with the optional norm clip and time truncation, in float32;
  the prediction is negated before the Euler step and the latents stay float32;
* decode: `latents / scaling_factor + shift_factor`, VAE decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, RopeEmbedder

from imagegen.common.attention import LOCAL_ATTENTION, AttentionBackend, AttentionLayout, Heads, joint_by_length
from imagegen.common.batching import check_batch, member_rows, row_lengths, stack_padded
from imagegen.common.cfg import z_image_cfg
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.denoise import DenoiseJob, DenoiseStage, StepHooks, run_batch_loop
from imagegen.common.graphs import maybe_graphed
from imagegen.common.kernels import (
    BlockStages,
    attention_rows,
    batch_dynamic,
    fuse_linears,
    join_rows,
    pad_rows,
    rotary_tables,
    rotate_pairs,
    sdpa,
)
from imagegen.common.latents import initial_noise, patchify, unpatchify
from imagegen.common.options import FamilyDefaults, ResolvedOptions
from imagegen.common.rope import Rotary
from imagegen.common.schedule import Schedule, make_schedule
from imagegen.common.sharding import LOCAL, SequencePlan, Sharding
from imagegen.common.text import encoder_trunk, ensure_fp32_rotary, take_masked

LATENT_CHANNELS = 16
PATCH_MULTIPLE = 16  # pixels per token side: VAE scale 8 x patch 2
PATCH_KEY = "2-1"  # all_x_embedder / all_final_layer key: patch 2, frame patch 1
TEMPLATE_VERSION = "z-image-1"

DEFAULTS = {
    "z-image": FamilyDefaults(
        steps=50,
        guidance_scale=5.0,
        size=1024,
        max_sequence_length=512,
        # The caption's RoPE ids (1 + k, padded to 32) must stay inside the 1024-long first axis.
        max_sequence_length_limit=960,
        supports_cfg_options=True,
        default_negative_prompt="",
        cfg_above=0.0,
    )
}


def padded_length(length: int) -> int:
    return length + (-length) % SEQ_MULTI_OF


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


# --------------------------------------------------------------------------------------------------------- vae
class ZImageVae:
    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self._setup(folder.load("vae", dtype, device))

    @classmethod
    def from_module(cls, vae: torch.nn.Module, family: str = "z-image") -> ZImageVae:
        """Over an already-built VAE (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(vae)
        return stage

    def _setup(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.device = vae.device
        self.dtype = self.vae.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents `[K, 16, h, w]` -> images `[K, 3, H, W]` in [-1, 1] (before postprocessing)."""
        config = self.vae.config
        latents = latents.to(device=self.device, dtype=self.dtype)
        latents = latents / config.scaling_factor + config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]


# -------------------------------------------------------------------------------------------------- DiT forward
class ZImageAttnProcessor:
    """Replaces the layers' attention processor: QKV, QK-norm, float32 RoPE, then the layout's backend.

    The last `layout.num_replicated` tokens of the sequence (the caption in the main layers) are replicated;
    the rest are sharded.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: AttentionLayout | None = None,
    ) -> torch.Tensor:
        layout = freqs_cis
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        heads = Heads(q, k, v)
        split = q.shape[1] - layout.num_replicated
        sharded = heads.rows(0, split).rotated(layout.sharded_rotary) if split > 0 else None
        replicated = heads.rows(split).rotated(layout.replicated_rotary) if layout.num_replicated else None
        if sharded is not None and replicated is not None:
            sharded_out, replicated_out = joint_by_length(
                layout.backend, sharded, replicated, False, layout.replicated_lengths
            )
        else:
            sharded_out, replicated_out = layout.backend.joint(sharded, replicated, False)
        out = torch.cat([o for o in (sharded_out, replicated_out) if o is not None], dim=1)
        return attn.to_out[0](out.flatten(2, 3).to(q.dtype))


class ZImageRope:
    """RoPE rows by 3-axis position id, from the same float64-built tables as the transformer's `RopeEmbedder`."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        config = transformer.config
        self.tables = RopeEmbedder.precompute_freqs_cis(config.axes_dims, config.axes_lens, theta=config.rope_theta)

    def __call__(self, ids: torch.Tensor) -> Rotary:
        return Rotary.from_complex(torch.cat([table[ids[:, a]] for a, table in enumerate(self.tables)], dim=-1))


def caption_ids(padded_len: int) -> torch.Tensor:
    """Caption token k (pads included) -> (1 + k, 0, 0)."""
    ids = torch.zeros(padded_len, 3, dtype=torch.long)
    ids[:, 0] = torch.arange(1, padded_len + 1)
    return ids


def image_ids(rows: int, cols: int, caption_padded_len: int) -> torch.Tensor:
    """Image token (y, x) -> (Lp + 1, y, x), raster order; pads to a multiple of 32 -> (0, 0, 0)."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    real = torch.stack([torch.full_like(y, caption_padded_len + 1), y, x], dim=-1).reshape(-1, 3)
    pads = torch.zeros(padded_length(rows * cols) - rows * cols, 3, dtype=torch.long)
    return torch.cat([real, pads])


@dataclass(frozen=True)
class ImageSlots:
    """This rank's image rows: a block of the single-process image sequence (latent tokens, then registers).

    Rows whose single-process index is below `num_latent` carry latent tokens; the others are the learned
    32-alignment registers (`x_pad_token`) or sequence-parallel padding, which attention leaves out.
    """

    plan: SequencePlan
    num_latent: int
    device: torch.device = torch.device("cpu")

    @cached_property
    def local_latent(self) -> int:
        start, end = self.plan.segment_range(0)
        return max(0, min(end, self.num_latent) - start)

    @cached_property
    def register_rows(self) -> torch.Tensor:
        """`[n, 1]` on the device: True where the learned register token replaces the embedded input."""
        return ((self.plan.local_index >= self.num_latent) | ~self.plan.local_real)[:, None].to(self.device)

    def latent_lengths(self) -> list[int]:
        ranges = (self.plan.segment_range(0, r) for r in range(self.plan.world))
        return [max(0, min(end, self.num_latent) - start) for start, end in ranges]


@dataclass(frozen=True)
class ZImageBranch:
    """One CFG branch's fixed inputs: its refined caption and the RoPE rows that depend on its length."""

    caption_tokens: torch.Tensor  # [1, Lp, dim], identical on every rank ([B, Lp, dim] for a batch)
    caption_rotary: Rotary  # [Lp] rows
    image_rotary: Rotary  # this rank's image rows ([B, n] rows when a batch's captions differ in length)
    caption_lengths: tuple[int, ...] | None = None  # a batch's real padded caption length per row (None: all)


def stack_branches(branches: list[ZImageBranch], counts: list[int]) -> ZImageBranch:
    """Several members' branches as one batch: member i's `counts[i]` rows, captions zero-padded to the
    longest (attention skips the padding per row), image RoPE per row (it depends on the caption length)."""
    if len(branches) == 1:
        return branches[0]
    lengths = [b.caption_tokens.shape[1] for b in branches]
    longest = max(lengths)
    captions = stack_padded([b.caption_tokens[0] for b in branches], counts, longest)
    caption_rotary = max((b.caption_rotary for b in branches), key=len)  # the others are its prefixes
    image = torch.cat([b.image_rotary.freqs[None].expand(n, -1, -1) for b, n in zip(branches, counts, strict=True)])
    return ZImageBranch(captions, caption_rotary, Rotary(image), row_lengths(lengths, counts))


class ZImageDiT:
    """Our top-level forward over `ZImageTransformer2DModel`'s modules and weights (basic, non-omni mode),
    working on 2x2 patch tokens (channel fastest) so the image sequence can be sharded."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        if transformer.config.get("siglip_feat_dim") is not None:
            raise ValueError("unsupported ZImageTransformer2DModel variant (omni / SigLIP)")
        self.transformer = transformer
        self.rope = ZImageRope(transformer)
        processor = ZImageAttnProcessor()
        for layer in (*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers):
            layer.attention.set_processor(processor)

    def branch(self, caption: torch.Tensor, rows: int, cols: int, slots: ImageSlots) -> ZImageBranch:
        """Image RoPE ids depend on this branch's padded caption length (its frame coordinate is Lp + 1)."""
        padded = padded_length(caption.shape[0])
        device = caption.device
        caption_rotary = self.rope(caption_ids(padded)).to(device)
        image_rotary = self.rope(image_ids(rows, cols, padded)).index(slots.plan.local_index).to(device)
        return ZImageBranch(self.embed_caption(caption, caption_rotary), caption_rotary, image_rotary)

    def embed_caption(self, caption: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        """Caption features `[L, Dc]` -> refined caption tokens `[1, Lp, dim]`.

        The context refiner has no timestep modulation, so this is computed once per request and branch, not
        every step; its attention covers the caption alone, which every rank holds whole (no communication).
        """
        tr = self.transformer
        tokens = tr.cap_embedder(caption)
        pad = tr.cap_pad_token.to(tokens.dtype).expand(len(rotary) - tokens.shape[0], -1)
        tokens = torch.cat([tokens, pad])[None]
        layout = AttentionLayout(LOCAL_ATTENTION, None, rotary, num_replicated=tokens.shape[1])
        for layer in tr.context_refiner:
            tokens = layer(tokens, None, layout)
        return tokens

    def __call__(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        branch: ZImageBranch,
        slots: ImageSlots,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """`tokens` `[B, n, 64]` this rank's latent tokens in the model dtype, `timestep` `[1]` (broadcast to
        every row) or `[B]` = (1000 - t) / 1000 in float32 -> model output for those tokens `[B, n, 64]` (not
        yet negated)."""
        tr = self.transformer
        batch = tokens.shape[0]
        adaln = tr.t_embedder(timestep * tr.t_scale).type_as(tokens)
        caption = branch.caption_tokens.expand(batch, -1, -1)

        fill = slots.plan.local_len - tokens.shape[1]
        rows = torch.cat([tokens, tokens.new_zeros(batch, fill, tokens.shape[2])], dim=1)
        image = tr.all_x_embedder[PATCH_KEY](rows)
        image = torch.where(slots.register_rows, tr.x_pad_token.to(image.dtype), image)

        refine = AttentionLayout(backend, branch.image_rotary, None)
        for layer in tr.noise_refiner:
            image = layer(image, None, refine, adaln)

        unified = torch.cat([image, caption], dim=1)
        joint = AttentionLayout(
            backend, branch.image_rotary, branch.caption_rotary, caption.shape[1], branch.caption_lengths
        )
        for layer in tr.layers:
            unified = layer(unified, None, joint, adaln)
        out = tr.all_final_layer[PATCH_KEY](unified, c=adaln)
        return out[:, : tokens.shape[1]]


# --------------------------------------------------------------------------------------------- fast DiT forward
def _layer_pre(layer, x, adaln, cos, sin):
    """adaLN modulation, norm, fused QKV, QK norm and RoPE of a modulated layer."""
    attn = layer.attention
    scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
    h = layer.attention_norm1(x) * (1.0 + scale_msa)
    q, k, v = F.linear(h, attn.qkv_weight).unflatten(-1, (3, attn.heads, -1)).unbind(2)
    q, k = rotate_pairs(attn.norm_q(q), cos, sin), rotate_pairs(attn.norm_k(k), cos, sin)
    return q, k, v, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()


def _layer_post(layer, x, joint, gate_msa, scale_mlp, gate_mlp):
    """Output projection, norm, gated residual, and the SwiGLU feed-forward with w1 and w3 fused. `joint` is
    the attention output `[B, N, H, D]` (per-row outputs already joined, zero-filled after each row's tokens)."""
    x = x + gate_msa * layer.attention_norm2(layer.attention.to_out[0](joint.flatten(2, 3)))
    ff = layer.feed_forward
    gate, up = F.linear(layer.ffn_norm1(x) * scale_mlp, ff.w13_weight).chunk(2, dim=-1)
    return x + gate_mlp * layer.ffn_norm2(ff.w2(F.silu(gate) * up))


@dataclass(frozen=True)
class ZImageFastInputs:
    """One request's fixed DiT inputs on the fast path (graph inputs), batch rows branch-major."""

    captions: torch.Tensor  # [B, L, dim] refined caption tokens, shorter captions zero-padded to the longest
    image_cos: torch.Tensor  # [B, n, head_dim / 2] float32: image RoPE (depends on the row's caption length)
    image_sin: torch.Tensor
    joint_cos: torch.Tensor  # [B, n + L, head_dim / 2]: image rows, then caption rows
    joint_sin: torch.Tensor
    registers: torch.Tensor  # [n, 1] bool: rows that hold the learned register token instead of an input

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.captions, self.image_cos, self.image_sin, self.joint_cos, self.joint_sin, self.registers)


class ZImageFastDiT:
    """The fast-path forward (`imagegen.common.kernels`) over the same modules and weights as `ZImageDiT`: per layer a
    compiled `_layer_pre` and `_layer_post` (caption length dynamic), attention over each row's real tokens
    with the measured kernel; QKV and the feed-forward's w1/w3 each fused into one matmul."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        for layer in (*transformer.noise_refiner, *transformer.layers):
            attn, ff = layer.attention, layer.feed_forward
            fuse_linears(attn, "qkv", [attn.to_q, attn.to_k, attn.to_v])
            fuse_linears(ff, "w13", [ff.w1, ff.w3])
        self.stages = BlockStages(_layer_pre, _layer_post)

    def __call__(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        inputs: ZImageFastInputs,
        caption_lengths: tuple[int, ...],
        compile: bool,
    ) -> torch.Tensor:
        """`tokens` `[B, n_latent, 64]` in the model dtype, `timestep` `[1]` = (1000 - t) / 1000 in float32 ->
        model output `[B, n_latent, 64]` (not yet negated)."""
        tr = self.transformer
        pre, post = self.stages(compile)
        batch = tokens.shape[0]
        adaln = tr.t_embedder(timestep * tr.t_scale).type_as(tokens)
        fill = inputs.registers.shape[0] - tokens.shape[1]
        rows = torch.cat([tokens, tokens.new_zeros(batch, fill, tokens.shape[2])], dim=1)
        image = tr.all_x_embedder[PATCH_KEY](rows)
        image = torch.where(inputs.registers, tr.x_pad_token.to(image.dtype), image)
        # The image and caption lengths are dynamic: one compiled graph serves every size and prompt, so a new
        # size costs only its CUDA graph capture and attention choice.
        for table in (inputs.image_cos, inputs.image_sin, inputs.joint_cos, inputs.joint_sin):
            batch_dynamic(table, 1)
        for layer in tr.noise_refiner:
            q, k, v, *mods = pre(layer, batch_dynamic(image, 1), adaln, inputs.image_cos, inputs.image_sin)
            image = post(layer, image, batch_dynamic(sdpa(q, k, v), 1), *mods)
        unified = torch.cat([image, inputs.captions], dim=1)
        valid = tuple(image.shape[1] + n for n in caption_lengths)
        for layer in tr.layers:
            batch_dynamic(unified, 1)
            q, k, v, *mods = pre(layer, unified, adaln, inputs.joint_cos, inputs.joint_sin)
            # Joined outside the compiled stage: a list of per-row outputs would put the batch in its guards.
            joint = batch_dynamic(join_rows(attention_rows(q, k, v, valid), unified.shape[1]), 1)
            unified = post(layer, unified, joint, *mods)
        out = tr.all_final_layer[PATCH_KEY](unified, c=adaln)
        return out[:, : tokens.shape[1]]


# ------------------------------------------------------------------------------------------------------ denoise
def latent_grid(width: int, height: int) -> tuple[int, int]:
    return 2 * (height // PATCH_MULTIPLE), 2 * (width // PATCH_MULTIPLE)


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


class ZImageDenoiser(DenoiseStage):
    """The denoise stage: float32 noise -> float32 final latents `[K, 16, h, w]`.

    Latents are held as 2x2 patch tokens for the whole loop (the Euler step is elementwise, so the layout is
    free); under sequence parallelism each rank holds a contiguous block of them and CFG's norm clip sums
    across ranks.
    """

    dit_class = ZImageDiT
    fast_class = ZImageFastDiT

    @torch.no_grad()
    def run_batch(
        self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding = LOCAL
    ) -> list[torch.Tensor | BaseException]:
        check_batch(jobs)
        if self.uses_fast_path(sharding):
            return self._run_fast(jobs, hooks, sharding)
        return self._run_reference(jobs, hooks, sharding)

    def _members(self, jobs: list[DenoiseJob]):
        """Per member: its noise and CFG scale per step; shared: the schedule and the latent grid."""
        opts = jobs[0].options
        noises = [noise_for(j.options.seed, j.options.num_images, opts.width, opts.height) for j in jobs]
        cpu_schedule = schedule_for(self.scheduler_config, opts.steps, opts.width, opts.height)
        scales = [
            guidance_per_step(cpu_schedule, j.options.guidance_scale, j.options.cfg_truncation)
            if opts.uses_cfg
            else None
            for j in jobs
        ]
        return noises, scales, cpu_schedule.to(self.device)

    def _branches(self, jobs, sharding, rows, cols, slots) -> tuple[list[str], list[dict[str, ZImageBranch]]]:
        """Each member's refined captions: the local CFG branches, and the positive one on every rank (steps
        that truncation leaves to it run it everywhere)."""
        all_names = ["positive", "negative"] if jobs[0].options.uses_cfg else ["positive"]
        fields = {"positive": "prompt_embeds", "negative": "negative_embeds"}
        wanted = {*sharding.branches(all_names), "positive"}
        branches = [
            {
                name: self.dit.branch(getattr(j, fields[name]).to(self.device, self.dtype), rows, cols, slots)
                for name in wanted
            }
            for j in jobs
        ]
        return all_names, branches

    def _run_reference(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        noises, scales, schedule = self._members(jobs)
        counts = [n.shape[0] for n in noises]
        height, width = noises[0].shape[2:]
        rows, cols = height // 2, width // 2
        slots = ImageSlots(sharding.plan((padded_length(rows * cols),)), rows * cols, self.device)
        backend = sharding.attention(slots.plan)
        start = slots.plan.segment_range(0)[0]
        latents = [
            patchify(n, channel_last=True)[:, start : start + slots.local_latent].to(self.device) for n in noises
        ]
        lengths = slots.latent_lengths()
        all_names, branches = self._branches(jobs, sharding, rows, cols, slots)

        def gather_tokens(tokens: torch.Tensor) -> torch.Tensor:
            return sharding.gather(tokens, lengths)

        def full(tokens: torch.Tensor) -> torch.Tensor:
            return unpatchify(gather_tokens(tokens), height, width, channel_last=True)

        def branch_forward(branch: ZImageBranch):
            def forward(tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                return self.dit(tokens, timestep, branch, slots, backend)

            return maybe_graphed(forward, self.device, self.settings.cuda_graphs)

        forwards: dict[tuple, object] = {}

        def forward_for(active: tuple[int, ...], name: str):
            if forwards and next(iter(forwards))[0] != active:
                forwards.clear()  # a member left: the old stacking is never used again
            if (active, name) not in forwards:
                member_counts = [counts[m] for m in active]
                forwards[(active, name)] = branch_forward(
                    stack_branches([branches[m][name] for m in active], member_counts)
                )
            return forwards[(active, name)]

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            model_input = torch.cat(latents).to(self.dtype)
            # One timestep row for all (broadcast): no row's arithmetic depends on the batch size.
            timestep = (1000 - schedule.timesteps[step : step + 1]) / 1000
            names = self._names(all_names, scales[active[0]], step)  # one batch key: the same for every member
            outputs = {name: forward_for(active, name)(model_input, timestep) for name in sharding.branches(names)}
            outputs = sharding.exchange(outputs, names)
            velocities = []
            for member, (lo, hi) in zip(active, member_rows([counts[m] for m in active]), strict=True):
                mine = [out[lo:hi] for out in outputs]
                if hooks[member].on_model_output is not None:
                    for name, out in zip(names, mine, strict=True):
                        hooks[member].model_output(step, name, full(out))
                velocities.append(self._velocity(jobs[member], mine, scales[member], step, gather_tokens))
            return velocities

        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        return [r if isinstance(r, BaseException) else full(r) for r in results]

    @staticmethod
    def _velocity(job: DenoiseJob, outputs: list[torch.Tensor], scales, step: int, gather_tokens=None) -> torch.Tensor:
        """The Euler step's velocity from one member's branch outputs: its own CFG scale and norm clip."""
        if len(outputs) == 1:
            return -outputs[0].float()
        pos, neg = (out.float() for out in outputs)
        if gather_tokens is None:
            return -z_image_cfg(pos, neg, scales[step], job.options.cfg_normalization)
        return -z_image_cfg(pos, neg, scales[step], job.options.cfg_normalization, gather_tokens)

    def _run_fast(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        """The local CFG branches of every member at each step in one batched forward (branch-major rows,
        members in order within a branch), replayed from `self.graphs` (steps that `cfg_truncation` leaves to
        the positive branch alone run a forward of their own shape)."""
        opts = jobs[0].options
        device, dtype = self.device, self.dtype
        noises, scales, schedule = self._members(jobs)
        counts = [n.shape[0] for n in noises]
        height, width = noises[0].shape[2:]
        rows, cols = height // 2, width // 2
        slots = ImageSlots(sharding.plan((padded_length(rows * cols),)), rows * cols, device)
        all_names, branches = self._branches(jobs, sharding, rows, cols, slots)
        compile = self.compile_for(
            sum(len(sharding.branches(self._names(all_names, scales[0], s))) for s in range(opts.steps))
        )
        batches: dict[tuple, tuple[ZImageFastInputs, tuple[int, ...]]] = {}

        def batch_inputs(active: tuple[int, ...], local: tuple[str, ...]) -> tuple[ZImageFastInputs, tuple[int, ...]]:
            if (active, local) not in batches:
                row_branches = [branches[m][name] for name in local for m in active for _ in range(counts[m])]
                lengths = tuple(b.caption_tokens.shape[1] for b in row_branches)
                longest = max(lengths)
                caption_rotary = max((b.caption_rotary for b in row_branches), key=len)  # a prefix of the longest
                cap_cos, cap_sin = rotary_tables(caption_rotary.freqs, device)
                image_tables = [rotary_tables(b.image_rotary.freqs, device) for b in row_branches]
                image_cos = torch.stack([c for c, _ in image_tables])
                image_sin = torch.stack([s for _, s in image_tables])
                batch = len(row_branches)
                inputs = ZImageFastInputs(
                    pad_rows([b.caption_tokens[0] for b in row_branches], longest),
                    image_cos,
                    image_sin,
                    torch.cat([image_cos, cap_cos.expand(batch, -1, -1)], dim=1),
                    torch.cat([image_sin, cap_sin.expand(batch, -1, -1)], dim=1),
                    slots.register_rows,
                )
                batches[(active, local)] = (inputs, lengths)
            return batches[(active, local)]

        def forward(lengths: tuple[int, ...]):
            def run(tokens: torch.Tensor, timestep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
                return self.fast(tokens, timestep, ZImageFastInputs(*tensors), lengths, compile)

            return run

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            timestep = (1000 - schedule.timesteps[step : step + 1]) / 1000
            names = self._names(all_names, scales[active[0]], step)
            local = tuple(sharding.branches(names))
            inputs, lengths = batch_inputs(active, local)
            batched = torch.cat(latents).to(dtype).repeat(len(local), 1, 1)
            out = self.graphs.run(("z-image", lengths, compile), forward(lengths), batched, timestep, *inputs.tensors())
            outputs = sharding.exchange(dict(zip(local, out.chunk(len(local)), strict=True)), names)
            velocities = []
            for member, (lo, hi) in zip(active, member_rows([counts[m] for m in active]), strict=True):
                mine = [output[lo:hi] for output in outputs]
                for name, output in zip(names, mine, strict=True):
                    hooks[member].model_output(step, name, unpatchify(output, height, width, channel_last=True))
                velocities.append(self._velocity(jobs[member], mine, scales[member], step))
            return velocities

        latents = [patchify(n, channel_last=True).to(device) for n in noises]
        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        if compile:
            self.compiled_forward_ran()
        return [r if isinstance(r, BaseException) else unpatchify(r, height, width, channel_last=True) for r in results]

    @staticmethod
    def _names(all_names: list[str], scales: list[float] | None, step: int) -> list[str]:
        """The branches step `step` runs: both while CFG applies, the positive one where truncation cut it."""
        return all_names if scales is not None and scales[step] > 0 else ["positive"]


def warmup_jobs(width: int, height: int, config: dict) -> list[DenoiseJob]:
    """Two-step jobs that trace every shape class a request of this size meets (`imagegen.common.warmup`): CFG with
    captions that pad to different lengths, and no CFG (Turbo)."""
    generator = torch.Generator().manual_seed(0)
    dim = config.get("cap_feat_dim", 2560)

    def embeds(length: int) -> torch.Tensor:
        return torch.randn(length, dim, generator=generator) * 0.1

    def options(negative: str | None, guidance: float) -> ResolvedOptions:
        return ResolvedOptions("z-image", "warm-up", negative, width, height, 2, guidance, 0.0, 1.0, 512, 0, 1)

    return [
        DenoiseJob(options("", 4.0), embeds(24), embeds(40)),
        DenoiseJob(options(None, 0.0), embeds(24)),
    ]
