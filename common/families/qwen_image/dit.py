"""Qwen-Image's reference DiT forward: our attention processor (QKV, QK-norm, float32 RoPE, the layout's
attention backend) and top-level forward over diffusers' `QwenImageTransformer2DModel` modules and weights."""

from __future__ import annotations

import numpy as np
import torch

from imagegen.common.attention import AttentionLayout, Heads, joint_by_length
from imagegen.common.rope import Rotary


class QwenJointAttnProcessor:
    """Replaces the blocks' attention processor: QKV, QK-norm, float32 RoPE, then the layout's backend.

    Text tokens are the replicated stream (placed before the image tokens); image tokens are the sharded one.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: AttentionLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' blocks hand their processor the RoPE argument unchanged: ours carries the whole layout
        # (`imagegen.common.attention.AttentionLayout`: backend, RoPE rows, replicated lengths) under that name.
        layout = image_rotary_emb
        head_dim = attn.inner_dim // attn.heads
        image = self._heads(attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, hidden_states, head_dim)
        text = self._heads(
            attn.add_q_proj,
            attn.add_k_proj,
            attn.add_v_proj,
            attn.norm_added_q,
            attn.norm_added_k,
            encoder_hidden_states,
            head_dim,
        )
        image, text = image.rotated(layout.sharded_rotary), text.rotated(layout.replicated_rotary)
        image_out, text_out = joint_by_length(layout.backend, image, text, True, layout.replicated_lengths)
        dtype = image.q.dtype
        image_out = attn.to_out[0](image_out.flatten(2, 3).to(dtype).contiguous())
        text_out = attn.to_add_out(text_out.flatten(2, 3).to(dtype).contiguous())
        return image_out, text_out

    @staticmethod
    def _heads(to_q, to_k, to_v, norm_q, norm_k, x: torch.Tensor, head_dim: int) -> Heads:
        q, k, v = (proj(x).unflatten(-1, (-1, head_dim)) for proj in (to_q, to_k, to_v))
        return Heads(norm_q(q) if norm_q is not None else q, norm_k(k) if norm_k is not None else k, v)


def qwen_rotary(
    transformer: torch.nn.Module, img_shapes: list[tuple[int, int, int]], text_len: int
) -> tuple[Rotary, Rotary]:
    """float32 RoPE rows of every image token (in `img_shapes` order) and of `text_len` text tokens.

    Entries are gathered from the transformer's own float32 tables (`pos_freqs`/`neg_freqs`): image `idx` sits
    at frame `idx`, rows and columns centred on 0; text continues after the largest half image side.
    """
    rope = transformer.pos_embed
    table = torch.cat([rope.neg_freqs, rope.pos_freqs], dim=0)  # row 4096 + p holds position p
    zero = rope.neg_freqs.shape[0]
    widths = [d // 2 for d in rope.axes_dim]
    starts = np.cumsum([0, *widths[:-1]])
    parts = []
    max_index = 0
    for idx, (frames, rows, cols) in enumerate(img_shapes):
        f = torch.arange(idx, idx + frames)
        y = torch.arange(rows) - (rows - rows // 2)
        x = torch.arange(cols) - (cols - cols // 2)
        grid = torch.stack(torch.meshgrid(f, y, x, indexing="ij"), dim=-1).reshape(-1, 3)
        parts.append(_gather_axes(table, grid + zero, starts, widths))
        max_index = max(max_index, rows // 2, cols // 2)
    text_pos = torch.arange(max_index, max_index + text_len)[:, None].expand(-1, 3) + zero
    text = _gather_axes(table, text_pos, starts, widths)
    return Rotary.from_complex(torch.cat(parts)), Rotary.from_complex(text)


def _gather_axes(table: torch.Tensor, positions: torch.Tensor, starts, widths) -> torch.Tensor:
    """Per axis a, columns [start_a, start_a + width_a) of the table rows at `positions[:, a]`."""
    return torch.cat(
        [table[positions[:, a], s : s + w] for a, (s, w) in enumerate(zip(starts, widths, strict=True))], dim=-1
    )


class QwenDiT:
    """Our top-level forward over `QwenImageTransformer2DModel`'s modules and weights."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        config = transformer.config
        if config.get("use_additional_t_cond") or config.get("use_layer3d_rope") or config.get("guidance_embeds"):
            raise ValueError("unsupported QwenImageTransformer2DModel variant (layered or guidance-distilled)")
        self.transformer = transformer
        self.zero_cond_t = bool(config.get("zero_cond_t", False))
        processor = QwenJointAttnProcessor()
        for block in transformer.transformer_blocks:
            block.attn.set_processor(processor)

    def __call__(
        self,
        hidden_states: torch.Tensor,
        text: torch.Tensor,
        timestep: torch.Tensor,
        layout: AttentionLayout,
        modulate_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `[B, S, 64]` packed tokens (noisy first, then edit images), `text` `[B, L, D]`,
        `timestep` `[1]` (shared by every row, broadcast) or `[B]`, already divided by 1000 -> prediction
        `[B, S, 64]` for every token."""
        tr = self.transformer
        hidden = tr.img_in(hidden_states)
        timestep = timestep.to(hidden.dtype)
        if self.zero_cond_t:
            # `timestep * 0`, not zeros: as diffusers writes it, for bitwise parity (the t = 0 row of Edit-2511).
            timestep = torch.cat([timestep, timestep * 0], dim=0)
        text = tr.txt_in(tr.txt_norm(text))
        temb = tr.time_text_embed(timestep, hidden)
        for block in tr.transformer_blocks:
            text, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=None,
                temb=temb,
                image_rotary_emb=layout,
                modulate_index=modulate_index,
            )
        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return tr.proj_out(tr.norm_out(hidden, temb))
