"""Qwen-Image-2.1's reference DiT forward over `QwenImage21Transformer2DModel`'s blocks and weights.

Read next to diffusers 0.42.1 `models/transformers/transformer_qwenimage21.py`. The model is single-stream and
block-causal: one joint sequence `[prefix, target]`, where the prefix is the prompt's tokens in the
vision-language encoder's order with each condition image's latent tokens at its vision slots (one slot = 2x2
latent tokens), and the target image's tokens come last. Attention is `q >= k or same image block`: text is
causal, every image block bidirectional inside, and nothing in the prefix ever sees the target. Prefix tokens are
modulated from t = 0 (`causal_condition`), so their keys and values are the same at every step: the first forward
stores them per block (`mode="extract"`) and later forwards compute only the target rows over the stored prefix
(`mode="cached"`), exactly as the pipeline's default `use_kv_cache=True` does.

For sequence parallelism the prefix is the replicated part and the target the sharded one:
* prefix queries attend only to prefix keys (block-causal, `prefix_attention`): every rank computes them locally
  from its whole copy, with no collective at all;
* target queries attend to every prefix key and every target key: one `AttentionBackend.joint` call whose
  replicated part has keys and values but no queries (`attend_prefixed`), so a Ulysses / ring backend moves
  only the target rows and counts every prefix key once, before the target keys, as one process does.

Our forward assembles the sequence, computes the float32 RoPE rows itself (`qwen21_rotary`, gathered from the
model's own complex64 tables) and hands both parts to the layout's backend; everything else runs the diffusers
modules unchanged (the blocks, with our processor installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache, QwenImage21KVLayerCache

from imagegen.common.attention import AttentionBackend, Heads
from imagegen.common.rope import Rotary

TOKENS_PER_SLOT = 4  # one vision-language image slot = a 2x2 group of latent tokens
MODES = ("full", "extract", "cached")
NEGATIVE_POSITIONS = 1024  # `QwenImage21Rope` tables end with positions -1024..-1 (after 0..8191)


# ------------------------------------------------------------------------------------------------ the sequence
@dataclass(frozen=True)
class Qwen21Sequence:
    """The joint sequence of one CFG branch: where the encoder put vision slots, and each image's token grid.

    `slots` `[L]` bool marks `<|image_pad|>` positions of the prompt embeddings (after the system turn is
    dropped); `condition_shapes` are the condition images' `(1, h, w)` latent grids in prompt order, and
    `target_shape` the generated image's. All batch rows share one sequence (as diffusers requires).
    """

    slots: torch.Tensor
    condition_shapes: tuple[tuple[int, int, int], ...]
    target_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        slot_tokens = TOKENS_PER_SLOT * int(self.slots.sum())
        condition_tokens = sum(math.prod(s) for s in self.condition_shapes)
        if slot_tokens != condition_tokens:
            raise ValueError(f"{condition_tokens} condition-image tokens for {slot_tokens // 4} vision slots")
        if self.target_tokens % TOKENS_PER_SLOT:
            raise ValueError(f"target grid {self.target_shape}: token count not a multiple of 4")

    @property
    def target_tokens(self) -> int:
        return math.prod(self.target_shape)

    @property
    def condition_tokens(self) -> int:
        return sum(math.prod(s) for s in self.condition_shapes)

    @property
    def prefix_len(self) -> int:
        return len(self.slots) + (TOKENS_PER_SLOT - 1) * int(self.slots.sum())

    @property
    def image_positions(self) -> torch.Tensor:
        """Prefix positions of the condition-image tokens, in latent order (`[condition_tokens]`)."""
        repeats = torch.where(self.slots, TOKENS_PER_SLOT, 1)
        is_image = torch.repeat_interleave(self.slots, repeats)
        return torch.nonzero(is_image).squeeze(1)

    @property
    def block_ids(self) -> torch.Tensor:
        """`[prefix_len]`: -1 on text, k on condition image k (blocks come from the grids, not from runs of
        slots: two adjacent images stay two blocks)."""
        ids = torch.full((self.prefix_len,), -1, dtype=torch.long)
        sizes = [math.prod(s) for s in self.condition_shapes]
        if sizes:
            ids[self.image_positions] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        return ids

    def segments(self) -> tuple[tuple[int, int, bool], ...]:
        """The prefix as `(start, end, is_text)` runs of one block id (the block-causal structure)."""
        ids = self.block_ids.tolist()
        runs, start = [], 0
        for index in range(1, len(ids) + 1):
            if index == len(ids) or ids[index] != ids[start]:
                runs.append((start, index, ids[start] < 0))
                start = index
        return tuple(runs)

    def positions(self) -> torch.Tensor:
        """`[prefix_len + target_tokens, 3]` (frame, row, column) RoPE positions of the joint sequence.

        Text advances one shared position on all three axes. An image block sits at the frame reached by the
        text before it, its rows/columns centred on 0 (`-(n - n // 2) .. n // 2 - 1`), and moves the running
        position on by max(h, w). The target is the last block.
        """
        rows = []
        position = 0
        ids = self.block_ids.tolist()
        shapes = [*self.condition_shapes, self.target_shape]
        cursor = 0
        for block, (_, h, w) in enumerate(shapes):
            start = ids.index(block, cursor) if block < len(self.condition_shapes) else len(ids)
            text = torch.arange(position, position + start - cursor)
            rows.append(text[:, None].expand(-1, 3))
            position += start - cursor
            y = torch.arange(h) - (h - h // 2)
            x = torch.arange(w) - (w - w // 2)
            grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)
            rows.append(torch.cat([torch.full((h * w, 1), position), grid], dim=1))
            position += max(h, w)
            cursor = start + h * w
        return torch.cat(rows)


def qwen21_rotary(transformer: torch.nn.Module, sequence: Qwen21Sequence) -> tuple[Rotary, Rotary]:
    """float32 RoPE rows of the prefix and of the target, gathered from the transformer's own complex64 tables
    (`pos_embed.freqs`: one per axis, positions 0..8191 then -1024..-1, so a negative position indexes from the
    end exactly as diffusers' gather does)."""
    positions = sequence.positions()
    tables = transformer.pos_embed.freqs
    freqs = torch.cat([tables[axis].cpu()[positions[:, axis]] for axis in range(3)], dim=-1)
    prefix = sequence.prefix_len
    return Rotary.from_complex(freqs[:prefix]), Rotary.from_complex(freqs[prefix:])


# ----------------------------------------------------------------------------------------------- attention
def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on `[B, S, H, D]` with an optional boolean mask, laid out as diffusers' native backend calls it."""
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, dropout_p=0.0
    )
    return out.permute(0, 2, 1, 3)


def prefix_attention(prefix: Heads, segments: tuple[tuple[int, int, bool], ...]) -> torch.Tensor:
    """Block-causal attention of the prefix over itself, one SDPA per segment as diffusers' default processor
    runs it: a segment's queries see the keys `[0, end)`; a text segment adds a causal triangle over its own."""
    outputs = []
    for start, end, is_text in segments:
        mask = None
        if is_text:
            n, device = end - start, prefix.q.device
            before = torch.ones(n, start, dtype=torch.bool, device=device)
            mask = torch.cat([before, torch.ones(n, n, dtype=torch.bool, device=device).tril()], dim=1)[None, None]
        outputs.append(sdpa_masked(prefix.q[:, start:end], prefix.k[:, :end], prefix.v[:, :end], mask))
    return torch.cat(outputs, dim=1)


class PrefixedAttentionBackend(Protocol):
    """What a backend may offer for 2.1: sharded queries over `[prefix keys, every sharded key]`."""

    def attend_prefixed(self, sharded: Heads, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> torch.Tensor: ...


def attend_prefixed(
    backend: AttentionBackend, sharded: Heads, prefix_k: torch.Tensor, prefix_v: torch.Tensor
) -> torch.Tensor:
    """The target rows' attention: their queries over every prefix key (replicated, whole on every rank) and
    every target key (sharded). Without a dedicated method the backend's `joint` does it, given a replicated part
    with keys and values but zero query rows: the one-process and Ulysses backends (and the ordered ring merge)
    then run exactly one process's SDPA over `[prefix, target]` keys for the target queries."""
    if hasattr(backend, "attend_prefixed"):
        return backend.attend_prefixed(sharded, prefix_k, prefix_v)
    keys_only = Heads(sharded.q[:, :0], prefix_k, prefix_v)
    out, _ = backend.joint(sharded, keys_only, True)
    return out


@dataclass(frozen=True)
class Qwen21Layout:
    """What our processor needs beyond the hidden states, for one forward (it travels in the blocks'
    `rotary_emb` argument, which only our processor reads).

    `mode`: "full" (whole sequence, nothing stored), "extract" (whole sequence, prefix keys/values stored in
    `cache`) or "cached" (target rows only, prefix keys/values read from `cache`).
    """

    backend: AttentionBackend
    target_rotary: Rotary  # this rank's target rows
    prefix_rotary: Rotary | None  # None in "cached" mode
    segments: tuple[tuple[int, int, bool], ...]
    mode: str = "full"
    cache: QwenImage21KVCache | None = None
    causal: bool = True  # False only in trap tests: the prefix then attends to itself bidirectionally

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_rotary is None else len(self.prefix_rotary)


class Qwen21AttnProcessor:
    """Replaces the blocks' processor: QKV, QK-norm, float32 RoPE per part, block-causal prefix attention locally,
    the target through the layout's backend, the output projection."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Qwen21Layout | None = None,
        layer_cache: QwenImage21KVLayerCache | None = None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = rotary_emb
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q).to(v.dtype), attn.norm_k(k).to(v.dtype)
        split = layout.prefix_len
        target = Heads(q[:, split:], k[:, split:], v[:, split:]).rotated(layout.target_rotary)
        outputs = []
        if layout.mode == "cached":
            prefix_k, prefix_v = layer_cache.get()
        else:
            prefix = Heads(q[:, :split], k[:, :split], v[:, :split]).rotated(layout.prefix_rotary)
            prefix_k, prefix_v = prefix.k, prefix.v
            if layout.mode == "extract":
                layer_cache.store(prefix_k.clone(), prefix_v.clone())
            if layout.causal:
                outputs.append(prefix_attention(prefix, layout.segments))
            else:
                outputs.append(sdpa_masked(prefix.q, prefix.k, prefix.v, None))
        outputs.append(attend_prefixed(layout.backend, target, prefix_k, prefix_v))
        out = torch.cat(outputs, dim=1).flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------------------------------- the forward
class QwenImage21DiT:
    """Our top-level forward over `QwenImage21Transformer2DModel`'s modules and weights."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        if not transformer.config.get("causal_condition", True):
            raise ValueError("QwenImage21Transformer2DModel without causal_condition is not supported")
        if transformer.config.get("patch_size", 1) != 1:
            raise ValueError("QwenImage21Transformer2DModel with patch_size != 1 is not supported")
        self.transformer = transformer
        processor = Qwen21AttnProcessor()
        for block in transformer.transformer_blocks:
            block.attn.set_processor(processor)

    def new_cache(self) -> QwenImage21KVCache:
        return QwenImage21KVCache(len(self.transformer.transformer_blocks))

    def prefix_hidden(
        self, text: torch.Tensor, condition_hidden: torch.Tensor | None, sequence: Qwen21Sequence
    ) -> torch.Tensor:
        """`[B, prefix_len, D]`: projected text at the text positions, projected condition tokens at the vision
        slots (each slot widened to 4 positions; the encoder's own output at a slot is dropped)."""
        repeats = torch.where(sequence.slots, TOKENS_PER_SLOT, 1).to(text.device)
        prefix = self.transformer.txt_in(text).repeat_interleave(repeats, dim=1)
        if condition_hidden is not None and condition_hidden.shape[1]:
            prefix[:, sequence.image_positions.to(text.device)] = condition_hidden
        return prefix

    def __call__(
        self,
        target: torch.Tensor,
        timestep: torch.Tensor,
        layout: Qwen21Layout,
        text: torch.Tensor | None = None,
        sequence: Qwen21Sequence | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`target` `[B, n, 64]` this rank's target tokens, `timestep` `[1]` (broadcast) or `[B]`, already divided
        by 1000; `text` `[B, L, context_dim]` prompt embeddings, `sequence` and `condition` `[B, S_c, 64]`
        packed condition latents (needed unless `layout.mode == "cached"`) -> prediction `[B, n, 64]`."""
        tr = self.transformer
        # img_in over [condition, target] in one matmul, as diffusers runs it (in every mode).
        latents = target if condition is None else torch.cat([condition.expand(target.shape[0], -1, -1), target], 1)
        hidden = tr.img_in(latents)
        split = 0 if condition is None else condition.shape[1]
        condition_hidden, hidden = hidden[:, :split], hidden[:, split:]
        prefix_len = layout.prefix_len
        if layout.mode != "cached":
            hidden = torch.cat([self.prefix_hidden(text, condition_hidden, sequence), hidden], dim=1)
        timestep = timestep.to(hidden.dtype)
        timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)  # last row: t = 0 for the prefix
        temb = tr.time_text_embed(timestep, hidden)
        modulation = tr.modulation(temb)
        is_target = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        is_target[:prefix_len] = False
        cache = layout.cache
        for index, block in enumerate(tr.transformer_blocks):
            hidden = block(
                hidden_states=hidden,
                modulation=modulation,
                rotary_emb=layout,
                target_token_mask=is_target,
                layer_cache=None if cache is None else cache.get_layer(index),
                kv_cache_mode=None if layout.mode == "full" else layout.mode,
            )
        return tr.proj_out(tr.norm_out(hidden, temb, is_target))[:, prefix_len:]


def layout_for(
    transformer: torch.nn.Module,
    sequence: Qwen21Sequence,
    backend: AttentionBackend,
    mode: str = "full",
    cache: QwenImage21KVCache | None = None,
    target_rows: torch.Tensor | None = None,
) -> Qwen21Layout:
    """The layout of one forward: float32 RoPE rows (the target's picked by `target_rows`, this rank's
    single-process indices; all by default), the prefix's block-causal segments, the cache mode."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    prefix_rotary, target_rotary = qwen21_rotary(transformer, sequence)
    if target_rows is not None:
        target_rotary = target_rotary.index(target_rows)
    device = transformer.img_in.weight.device
    return Qwen21Layout(
        backend=backend,
        target_rotary=target_rotary.to(device),
        prefix_rotary=None if mode == "cached" else prefix_rotary.to(device),
        segments=sequence.segments(),
        mode=mode,
        cache=cache,
    )
