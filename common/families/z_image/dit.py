"""Z-Image's reference DiT forward: our attention processor (QKV, QK-norm, float32 RoPE, the layout's attention
backend), RoPE ids, the image slots of a sequence shard, and the top-level forward over diffusers'
`ZImageTransformer2DModel` modules and weights (basic, non-omni mode)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from diffusers.models.transformers.transformer_z_image import RopeEmbedder

from imagegen.common.attention import LOCAL_ATTENTION, AttentionBackend, AttentionLayout, Heads, joint_by_length
from imagegen.common.batching import row_lengths, stack_padded
from imagegen.common.call_rows import CallRows
from imagegen.common.families.z_image import PATCH_KEY, padded_length
from imagegen.common.rope import Rotary
from imagegen.common.sharding import SequencePlan


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
        # diffusers' blocks hand their processor the RoPE argument unchanged: ours carries the whole layout
        # (`imagegen.common.attention.AttentionLayout`: backend, RoPE rows, replicated lengths) under that name.
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


def embed_image(
    transformer: torch.nn.Module, tokens: torch.Tensor, timestep: torch.Tensor, rows: CallRows, registers: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The prologue of both forwards: the time embedding of each diffusers call `rows` names (`[size, 256]`
    each), and this rank's latent tokens `[B, n, 64]` filled to its local length (`registers` `[n_local, 1]`),
    embedded, the learned register token where `registers` is set."""
    tr = transformer
    batch = tokens.shape[0]
    adaln = [tr.t_embedder(t * tr.t_scale).type_as(tokens) for t in rows.timesteps(timestep)]
    fill = registers.shape[0] - tokens.shape[1]
    padded = torch.cat([tokens, tokens.new_zeros(batch, fill, tokens.shape[2])], dim=1)
    image = tr.all_x_embedder[PATCH_KEY](padded)
    return adaln, torch.where(registers, tr.x_pad_token.to(image.dtype), image)


def modulated_layer(
    layer: torch.nn.Module, x: torch.Tensor, layout: AttentionLayout, mod: torch.Tensor
) -> torch.Tensor:
    """diffusers' `ZImageTransformerBlock.forward` (global modulation) with its `adaLN_modulation` output `mod`
    `[B, 4 * dim]` given: the caller computes it on diffusers' row count (`CallRows`)."""
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
    gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
    scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
    attn_out = layer.attention(layer.attention_norm1(x) * scale_msa, attention_mask=None, freqs_cis=layout)
    x = x + gate_msa * layer.attention_norm2(attn_out)
    return x + gate_mlp * layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(x) * scale_mlp))


def final_layer(
    transformer: torch.nn.Module, x: torch.Tensor, adaln: list[torch.Tensor], rows: CallRows
) -> torch.Tensor:
    """diffusers' `FinalLayer.forward` (global modulation), its modulation on diffusers' row count."""
    final = transformer.all_final_layer[PATCH_KEY]
    scale = 1.0 + rows.apply(final.adaLN_modulation, adaln)
    return final.linear(final.norm_final(x) * scale.unsqueeze(1))


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
        # Embed all Lp rows as diffusers does (`_pad_with_ids` repeats the last feature row, the pad rows then
        # become `cap_pad_token`): CPU GEMMs round a row differently with the number of rows in the call.
        real = caption.shape[0]
        rows = torch.cat([caption, caption[-1:].expand(len(rotary) - real, -1)])
        tokens = tr.cap_embedder(rows)
        tokens = torch.cat([tokens[:real], tr.cap_pad_token.to(tokens.dtype).expand(len(rotary) - real, -1)])[None]
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
        rows: CallRows | None = None,
    ) -> torch.Tensor:
        """`tokens` `[B, n, 64]` this rank's latent tokens in the model dtype, `timestep` `[1]` = (1000 - t) / 1000
        in float32 (the same for every row) -> model output for those tokens `[B, n, 64]` (not yet negated).
        `rows`: the diffusers call each row's time embedding and modulations come from (default: one call of B)."""
        tr = self.transformer
        rows = rows or CallRows.of([(tokens.shape[0], r) for r in range(tokens.shape[0])])
        adaln, image = embed_image(tr, tokens, timestep, rows, slots.register_rows)
        caption = branch.caption_tokens.expand(tokens.shape[0], -1, -1)

        refine = AttentionLayout(backend, branch.image_rotary, None)
        for layer in tr.noise_refiner:
            image = modulated_layer(layer, image, refine, rows.apply(layer.adaLN_modulation, adaln))

        unified = torch.cat([image, caption], dim=1)
        joint = AttentionLayout(
            backend, branch.image_rotary, branch.caption_rotary, caption.shape[1], branch.caption_lengths
        )
        for layer in tr.layers:
            unified = modulated_layer(layer, unified, joint, rows.apply(layer.adaLN_modulation, adaln))
        return final_layer(tr, unified, adaln, rows)[:, : tokens.shape[1]]
