"""Z-Image's fast-path DiT forward (`imagegen.common.kernels`) over the same modules and weights as
`dit.ZImageDiT`: compiled layer stages around the measured attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imagegen.common.call_rows import CallRows
from imagegen.common.families.z_image import PATCH_KEY
from imagegen.common.families.z_image.dit import embed_image
from imagegen.common.kernels import (
    BlockStages,
    attention_rows,
    batch_dynamic,
    fuse_linears,
    join_rows,
    rotate_pairs,
    sdpa,
)


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
        rows: CallRows | None = None,
    ) -> torch.Tensor:
        """`tokens` `[B, n_latent, 64]` in the model dtype, `timestep` `[1]` = (1000 - t) / 1000 in float32 ->
        model output `[B, n_latent, 64]` (not yet negated). `rows`: the diffusers call each row's time embedding
        comes from (`CallRows`; default one call of B). The layers' modulations run on the forward's B rows
        inside the compiled stage, which is diffusers' count for one unbatched job with both CFG branches local."""
        tr = self.transformer
        pre, post = self.stages(compile)
        rows = rows or CallRows.of([(tokens.shape[0], r) for r in range(tokens.shape[0])])
        calls, image = embed_image(tr, tokens, timestep, rows, inputs.registers)
        adaln = rows.take(calls)
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
