"""Qwen-Image's fast-path DiT forward (`imagegen.common.kernels`) over the same modules and weights as
`dit.QwenDiT`: compiled block stages around the measured attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imagegen.common.fused import linear_gelu_tanh
from imagegen.common.kernels import (
    BlockStages,
    attention_rows,
    batch_dynamic,
    fuse_linears,
    join_rows,
    mark_dynamic,
    rotate_pairs,
)


# --------------------------------------------------------------------------------------------- fast DiT forward
def _modulate(x: torch.Tensor, params: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's `_modulate` for `params` `[T, 3D]` shared by every batch row: T = 1, or 2 with Edit-2511's
    `zero_cond_t` (row 1 is the t = 0 modulation of the condition-image tokens, selected by `index`)."""
    shift, scale, gate = params.chunk(3, dim=-1)
    if index is None:
        shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
    else:
        noisy = index[None, :, None] == 0
        shift, scale, gate = (torch.where(noisy, p[0:1, None], p[1:2, None]) for p in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


def _block_pre(block, hidden, text, img_mod1, txt_mod1, index, img_cos, img_sin, txt_cos, txt_sin):
    """Norm + modulation, fused QKV, QK norm and RoPE of both streams; the joint `[image, text]` q, k, v."""
    attn = block.attn
    img_x, img_gate1 = _modulate(block.img_norm1(hidden), img_mod1, index)
    txt_x, txt_gate1 = _modulate(block.txt_norm1(text), txt_mod1, None)
    iq, ik, iv = F.linear(img_x, attn.img_qkv_weight, attn.img_qkv_bias).unflatten(-1, (3, attn.heads, -1)).unbind(2)
    tq, tk, tv = F.linear(txt_x, attn.txt_qkv_weight, attn.txt_qkv_bias).unflatten(-1, (3, attn.heads, -1)).unbind(2)
    iq, ik = rotate_pairs(attn.norm_q(iq), img_cos, img_sin), rotate_pairs(attn.norm_k(ik), img_cos, img_sin)
    tq = rotate_pairs(attn.norm_added_q(tq), txt_cos, txt_sin)
    tk = rotate_pairs(attn.norm_added_k(tk), txt_cos, txt_sin)
    q, k, v = (torch.cat(pair, dim=1) for pair in ((iq, tq), (ik, tk), (iv, tv)))
    return q, k, v, img_gate1, txt_gate1


def _mlp(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' `FeedForward(activation_fn="gelu-approximate")` with the GELU in the first matmul's epilogue."""
    first, last = ff.net[0].proj, ff.net[-1]
    return last(linear_gelu_tanh(x, first.weight, first.bias))


def _block_post(block, hidden, text, joint, img_gate1, txt_gate1, img_mod2, txt_mod2, index):
    """Output projections, gated residuals, norm2 + modulation and the MLPs of both streams. `joint` is the
    attention output `[B, S + L, H, D]` (per-row outputs already joined)."""
    attn = block.attn
    split = hidden.shape[1]
    img_attn, txt_attn = joint[:, :split], joint[:, split:]
    hidden = hidden + img_gate1 * attn.to_out[0](img_attn.flatten(2, 3))
    text = text + txt_gate1 * attn.to_add_out(txt_attn.flatten(2, 3))
    img_x, img_gate2 = _modulate(block.img_norm2(hidden), img_mod2, index)
    hidden = hidden + img_gate2 * _mlp(block.img_mlp, img_x)
    txt_x, txt_gate2 = _modulate(block.txt_norm2(text), txt_mod2, None)
    text = text + txt_gate2 * _mlp(block.txt_mlp, txt_x)
    return hidden, text


@dataclass(frozen=True)
class QwenFastInputs:
    """One request's fixed DiT inputs on the fast path (graph inputs; the text is padded to its longest row)."""

    text: torch.Tensor  # [B, L, D] prompt embeddings, rows of shorter prompts zero-padded
    condition: torch.Tensor  # [B, S - S0, 64] edit-image tokens (S - S0 may be 0)
    img_cos: torch.Tensor  # [S, head_dim / 2] float32
    img_sin: torch.Tensor
    txt_cos: torch.Tensor  # [L, head_dim / 2]
    txt_sin: torch.Tensor
    modulate_index: torch.Tensor  # [S] int: 1 on condition-image tokens (Edit-2511's zero_cond_t), else unused

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.text, self.condition, self.img_cos, self.img_sin, self.txt_cos, self.txt_sin, self.modulate_index)


class QwenFastDiT:
    """The fast-path forward (`imagegen.common.kernels`) over the same modules and weights as `QwenDiT`: per block a
    compiled `_block_pre` and `_block_post` (text length dynamic) around attention over each row's real tokens
    with the measured kernel. Each stream's QKV projections are fused into one matmul, the MLPs' GELU into
    its matmul's epilogue (`imagegen.common.fused`), and the blocks' timestep modulations are computed for every
    step of a request at once (`modulations`), so their weights (a large share of the model's) are read once per
    request, not once per step."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.zero_cond_t = bool(transformer.config.get("zero_cond_t", False))
        for block in transformer.transformer_blocks:
            attn = block.attn
            fuse_linears(attn, "img_qkv", [attn.to_q, attn.to_k, attn.to_v])
            fuse_linears(attn, "txt_qkv", [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
        self.stages = BlockStages(_block_pre, _block_post)

    def _temb(self, timestep: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        return tr.time_text_embed(timestep.to(tr.dtype), tr.img_in.weight)

    def modulations(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's image and text modulation for each step of `timesteps` `[N]` (already / 1000):
        `[N, blocks, T, 6 dim]` (T = 2 with `zero_cond_t`: row 1 is the t = 0 modulation) and `[N, blocks, 1,
        6 dim]`."""
        temb = self._temb(timesteps)
        image, text = [], []
        # `* 0`, not zeros: as diffusers writes Edit-2511's t = 0 row, for bitwise parity.
        zero = self._temb(timesteps[:1] * 0) if self.zero_cond_t else None
        for block in self.transformer.transformer_blocks:
            mod = block.img_mod(temb)[:, None]
            if zero is not None:
                mod = torch.cat([mod, block.img_mod(zero)[:, None].expand_as(mod)], dim=1)
            image.append(mod)
            text.append(block.txt_mod(temb)[:, None])
        return torch.stack(image, dim=1), torch.stack(text, dim=1)

    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        img_mods: torch.Tensor,
        txt_mods: torch.Tensor,
        inputs: QwenFastInputs,
        text_lengths: tuple[int, ...],
        compile: bool,
    ) -> torch.Tensor:
        """`latents` `[B, S0, 64]` noisy tokens (the batch is branch-major: CFG rows after positive rows),
        `timestep` `[1]` already divided by 1000, this step's `modulations` -> prediction `[B, S0, 64]`."""
        tr = self.transformer
        pre, post = self.stages(compile)
        hidden = tr.img_in(torch.cat([latents, inputs.condition], dim=1))
        index = inputs.modulate_index if self.zero_cond_t else None
        # The image sequence (image size, plus edit images) and the text length are dynamic: one compiled graph
        # serves every size and prompt, so a new size costs only its CUDA graph capture and attention choice.
        for table in (inputs.img_cos, inputs.img_sin, inputs.modulate_index, inputs.txt_cos, inputs.txt_sin):
            mark_dynamic(table, 0)
        text = tr.txt_in(tr.txt_norm(inputs.text))
        image_len = hidden.shape[1]
        valid = tuple(image_len + n for n in text_lengths)
        for i, block in enumerate(tr.transformer_blocks):
            img_mod1, img_mod2 = img_mods[i].chunk(2, dim=-1)
            txt_mod1, txt_mod2 = txt_mods[i].chunk(2, dim=-1)
            batch_dynamic(text, 1)
            batch_dynamic(hidden, 1)
            q, k, v, img_gate1, txt_gate1 = pre(
                block, hidden, text, img_mod1, txt_mod1, index, inputs.img_cos, inputs.img_sin, inputs.txt_cos,
                inputs.txt_sin,
            )  # fmt: skip
            # Joined outside the compiled stage: a list of per-row outputs would make its length (the batch)
            # part of the compiled graph's guards.
            joint = batch_dynamic(join_rows(attention_rows(q, k, v, valid), image_len + text.shape[1]), 1)
            hidden, text = post(block, hidden, text, joint, img_gate1, txt_gate1, img_mod2, txt_mod2, index)
        return tr.proj_out(tr.norm_out(hidden, self._temb(timestep)))[:, : latents.shape[1]]
