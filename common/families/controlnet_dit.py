"""ControlNet forwards on our sequence layout, and the DiT forwards that add their residuals.

Both ControlNets are DiTs themselves with the base model's joint attention, so they run through the same
attention processors and `AttentionLayout` as our DiT forwards: under sequence parallelism a rank computes the
residuals of its own image rows (and the replicated text rows), exactly like its DiT rows. Read next to diffusers
0.42.1 `models/controlnets/controlnet_{qwenimage,z_image}.py` and the transformers' residual additions:

* Qwen-Image (`QwenImageControlNetModel`): `img_in(noisy) + controlnet_x_embedder(control)`, its own time and
  text embedding, RoPE and dual-stream blocks; block k's image output through `controlnet_blocks[k]`, times the
  scale. The transformer adds sample `i // ceil(blocks / samples)` to the image stream after block i; the text
  stream gets nothing. Several controls (diffusers: one union net, several images) sum their scaled samples.
* Z-Image (`ZImageControlNetModel`, sharing the transformer's embedders, refiners and pad tokens): control
  tokens through a control noise refiner (three layouts, below), then the control layers over
  `[control tokens, caption]` next to the unified `[image, caption]` sequence; hint k (scaled) is added to the
  whole unified sequence (image AND caption rows) after main layer `control_layers_places[k]`. With
  `add_control_noise_refiner` set, refiner-stage hints shape only the ControlNet's own copy of the refined
  image: diffusers never adds them to the transformer's noise refiner.

`qwen_forward_with_residuals` / `z_image_forward_with_hints` are `QwenDiT.__call__` / `ZImageDiT.__call__` plus
the residual additions; once the family packages land they belong in those forwards as an optional argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from imagegen.common.attention import AttentionBackend, AttentionLayout
from imagegen.common.families.qwen_image.dit import QwenDiT, QwenJointAttnProcessor, qwen_rotary
from imagegen.common.families.z_image import PATCH_KEY
from imagegen.common.families.z_image.dit import ImageSlots, ZImageAttnProcessor, ZImageBranch, ZImageDiT
from imagegen.common.rope import Rotary


# ------------------------------------------------------------------------------------------------- Qwen-Image
class QwenControlNet:
    """Our forward over a `QwenImageControlNetModel`'s modules: per-block residuals for the noisy image rows."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        self.controlnet = controlnet
        processor = QwenJointAttnProcessor()
        for block in controlnet.transformer_blocks:
            block.attn.set_processor(processor)

    @property
    def num_samples(self) -> int:
        return len(self.controlnet.controlnet_blocks)

    def rotary(self, grid: tuple[int, int, int], text_len: int) -> tuple[Rotary, Rotary]:
        """RoPE rows from the ControlNet's own tables, for the noisy image alone (diffusers passes it only the
        noisy `img_shapes` entry) and `text_len` text tokens."""
        return qwen_rotary(self.controlnet, [grid], text_len)

    def __call__(
        self,
        noisy: torch.Tensor,
        control: torch.Tensor,
        text: torch.Tensor,
        timestep: torch.Tensor,
        layout: AttentionLayout,
        scale: float,
    ) -> list[torch.Tensor]:
        """`noisy` `[B, n, 64]` this rank's noisy tokens, `control` `[B, n, 64 + extra]` the packed control latents
        on the same rows, `text` `[B, L, D]` prompt embeddings (diffusers: always the positive prompt, also for
        the CFG branch), `timestep` `[1]` or `[B]` already / 1000 -> one `[B, n, dim]` residual per ControlNet
        block, already scaled."""
        cn = self.controlnet
        hidden = cn.img_in(noisy) + cn.controlnet_x_embedder(control)
        temb = cn.time_text_embed(timestep, hidden)
        text = cn.txt_in(cn.txt_norm(text))
        samples = []
        for block, project in zip(cn.transformer_blocks, cn.controlnet_blocks, strict=True):
            text, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=None,
                temb=temb,
                image_rotary_emb=layout,
            )
            samples.append(project(hidden) * scale)
        return samples


def qwen_block_residuals(samples: Sequence[list[torch.Tensor]], num_blocks: int) -> list[torch.Tensor | None]:
    """The residual each DiT block adds to its image stream: control k's sample `i // ceil(blocks / len)`,
    summed over controls in order (the sum `QwenImageMultiControlNetModel` forms, then the transformer's
    indexing; the same bits when the controls have equal sample counts)."""
    residuals: list[torch.Tensor | None] = [None] * num_blocks
    for per_control in samples:
        interval = math.ceil(num_blocks / len(per_control))
        for i in range(num_blocks):
            sample, previous = per_control[i // interval], residuals[i]
            residuals[i] = sample if previous is None else previous + sample
    return residuals


def qwen_forward_with_residuals(
    dit: QwenDiT,
    hidden_states: torch.Tensor,
    text: torch.Tensor,
    timestep: torch.Tensor,
    layout: AttentionLayout,
    residuals: Sequence[torch.Tensor | None],
    modulate_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """`QwenDiT.__call__` with `residuals[i]` added to the image stream after block i (rows as `hidden_states`:
    diffusers' ControlNet pipelines are text-to-image, the noisy tokens are the whole image stream)."""
    tr = dit.transformer
    hidden = tr.img_in(hidden_states)
    timestep = timestep.to(hidden.dtype)
    if dit.zero_cond_t:
        timestep = torch.cat([timestep, timestep * 0], dim=0)
    text = tr.txt_in(tr.txt_norm(text))
    temb = tr.time_text_embed(timestep, hidden)
    for block, residual in zip(tr.transformer_blocks, residuals, strict=True):
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            temb=temb,
            image_rotary_emb=layout,
            modulate_index=modulate_index,
        )
        if residual is not None:
            hidden = hidden + residual
    if dit.zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]
    return tr.proj_out(tr.norm_out(hidden, temb))


# ---------------------------------------------------------------------------------------------------- Z-Image
@dataclass(frozen=True)
class ZImageStage:
    """What a Z-Image ControlNet reads from the DiT forward it steers, all on this rank's rows."""

    adaln: torch.Tensor  # [B or 1, 256] timestep embedding
    embedded: torch.Tensor  # [B, n, dim] image rows after the patch embedder and registers, before the refiner
    refined: torch.Tensor  # [B, n, dim] the DiT's noise-refiner output
    caption: torch.Tensor  # [B, Lp, dim] refined caption tokens
    refine_layout: AttentionLayout  # image rows alone
    joint_layout: AttentionLayout  # [image rows, caption]


class ZImageControlNet:
    """Our forward over a `ZImageControlNetModel`'s own modules (control embedder, control noise refiner, control
    layers) and the transformer's noise refiner, on our 2x2-token layout (channel fastest)."""

    def __init__(self, controlnet: torch.nn.Module, transformer: torch.nn.Module) -> None:
        self.controlnet = controlnet
        self.transformer = transformer
        config = controlnet.config
        self.mode: str | None = config.add_control_noise_refiner
        self.places: list[int] = list(config.control_layers_places)
        self.refiner_places: list[int] = list(config.control_refiner_layers_places or [])
        processor = ZImageAttnProcessor()
        for layer in (*controlnet.control_layers, *(controlnet.control_noise_refiner or ())):
            layer.attention.set_processor(processor)

    def embed(self, control: torch.Tensor, slots: ImageSlots) -> torch.Tensor:
        """`control` `[B, n_latent_local, 4 * control_in_dim]` this rank's latent rows -> `[B, n, dim]`, the
        32-alignment registers and padding rows holding the transformer's `x_pad_token` (as diffusers does)."""
        fill = slots.plan.local_len - control.shape[1]
        rows = torch.cat([control, control.new_zeros(control.shape[0], fill, control.shape[2])], dim=1)
        tokens = self.controlnet.control_all_x_embedder[PATCH_KEY](rows)
        return torch.where(slots.register_rows, self.transformer.x_pad_token.to(tokens.dtype), tokens)

    def hints(self, control: torch.Tensor, stage: ZImageStage, scale: float) -> dict[int, torch.Tensor]:
        """Main-layer index -> scaled hint `[B, n + Lp, dim]` over the unified rows (image rows, then caption)."""
        cn, adaln = self.controlnet, stage.adaln
        refine = stage.refine_layout
        if self.mode is None:
            image = stage.refined  # the ControlNet refines the same image as the DiT: reuse it
            for layer in cn.control_noise_refiner:
                control = layer(control, None, refine, adaln)
        else:
            layers = cn.control_layers if self.mode == "control_layers" else cn.control_noise_refiner
            for layer in layers:
                control = layer(control, stage.embedded, None, refine, adaln)
            *skips, control = control.unbind(0)
            refiner_hints = {place: skips[k] * scale for k, place in enumerate(self.refiner_places)}
            image = stage.embedded
            for index, layer in enumerate(self.transformer.noise_refiner):
                image = layer(image, None, refine, adaln)
                if index in refiner_hints:
                    image = image + refiner_hints[index]
        unified = torch.cat([image, stage.caption], dim=1)
        control = torch.cat([control, stage.caption], dim=1)
        for layer in cn.control_layers:
            control = layer(control, unified, None, stage.joint_layout, adaln)
        skips = control.unbind(0)[:-1]
        return {place: skips[k] * scale for k, place in enumerate(self.places)}


@dataclass(frozen=True)
class ZImageControl:
    """One control of a request: its ControlNet, this rank's control rows and this step's scale."""

    net: ZImageControlNet
    control: torch.Tensor  # [B, n_latent_local, 4 * control_in_dim]
    scale: float


def z_image_stage(
    dit: ZImageDiT,
    tokens: torch.Tensor,
    timestep: torch.Tensor,
    branch: ZImageBranch,
    slots: ImageSlots,
    backend: AttentionBackend,
) -> ZImageStage:
    """The first half of `ZImageDiT.__call__` (time embedding, patch embedding, noise refiner), kept apart so
    the ControlNets read its intermediate rows instead of recomputing them."""
    tr = dit.transformer
    batch = tokens.shape[0]
    adaln = tr.t_embedder(timestep * tr.t_scale).type_as(tokens)
    caption = branch.caption_tokens.expand(batch, -1, -1)
    fill = slots.plan.local_len - tokens.shape[1]
    rows = torch.cat([tokens, tokens.new_zeros(batch, fill, tokens.shape[2])], dim=1)
    embedded = tr.all_x_embedder[PATCH_KEY](rows)
    embedded = torch.where(slots.register_rows, tr.x_pad_token.to(embedded.dtype), embedded)
    refine = AttentionLayout(backend, branch.image_rotary, None)
    image = embedded
    for layer in tr.noise_refiner:
        image = layer(image, None, refine, adaln)
    joint = AttentionLayout(
        backend, branch.image_rotary, branch.caption_rotary, caption.shape[1], branch.caption_lengths
    )
    return ZImageStage(adaln, embedded, image, caption, refine, joint)


def z_image_forward_with_hints(
    dit: ZImageDiT,
    tokens: torch.Tensor,
    timestep: torch.Tensor,
    branch: ZImageBranch,
    slots: ImageSlots,
    backend: AttentionBackend,
    controls: Sequence[ZImageControl] = (),
) -> torch.Tensor:
    """`ZImageDiT.__call__` with every control's hints added (summed over controls in order) to the unified
    sequence after their main layers. Each control runs with this branch's caption (diffusers batches the CFG
    branches through the ControlNet too)."""
    tr = dit.transformer
    stage = z_image_stage(dit, tokens, timestep, branch, slots, backend)
    hints: dict[int, torch.Tensor] = {}
    for item in controls:
        for place, hint in item.net.hints(item.net.embed(item.control, slots), stage, item.scale).items():
            hints[place] = hint if place not in hints else hints[place] + hint
    unified = torch.cat([stage.refined, stage.caption], dim=1)
    for index, layer in enumerate(tr.layers):
        unified = layer(unified, None, stage.joint_layout, stage.adaln)
        if index in hints:
            unified = unified + hints[index]
    out = tr.all_final_layer[PATCH_KEY](unified, c=stage.adaln)
    return out[:, : tokens.shape[1]]
