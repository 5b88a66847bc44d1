"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509/2511): every fact specific to this family.

Read next to diffusers 0.42.1 `pipelines/qwenimage/pipeline_qwenimage{,_edit,_edit_plus}.py` and
`models/transformers/transformer_qwenimage.py`, which this module reproduces stage by stage:

* encode: chat template with a system prompt, last hidden layer of Qwen2.5-VL, the template prefix dropped
  (34 tokens for text-to-image, 64 for the edit pipelines), text-to-image truncated to `max_sequence_length`;
  edit prompts carry the input image(s) as vision tokens ("Picture k: ..." for Edit-Plus);
* prepare: noise drawn `[K, 1, 16, h, w]` in the model dtype, packed to 2x2 tokens (channel slowest);
  sigmas `linspace(1, 1/N, N)` shifted by `mu` from the noisy token count; edit images VAE-encoded (mode),
  normalised and packed, one segment per image;
* denoise: our DiT forward over the diffusers blocks with our attention processor: `[text, image]` joint
  attention, RoPE tables in float32, the timestep rounded to the model dtype before `/ 1000`, Edit-2511's
  `zero_cond_t`; true CFG with per-token norm rescale in the model dtype;
* decode: `latents * std + mean`, VAE decode of the single frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from imagegen.common.attention import AttentionLayout, Heads, joint_by_length
from imagegen.common.batching import check_batch, member_rows, row_lengths, stack_padded
from imagegen.common.cfg import qwen_true_cfg
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.denoise import DenoiseJob, DenoiseStage, StepHooks, run_batch_loop
from imagegen.common.fused import linear_gelu_tanh
from imagegen.common.graphs import maybe_graphed
from imagegen.common.kernels import (
    BlockStages,
    attention_rows,
    batch_dynamic,
    fuse_linears,
    join_rows,
    mark_dynamic,
    pad_rows,
    rotary_tables,
    rotate_pairs,
)
from imagegen.common.latents import initial_noise, patchify, unpatchify
from imagegen.common.options import FamilyDefaults, ResolvedOptions
from imagegen.common.rope import Rotary
from imagegen.common.schedule import Schedule, make_schedule
from imagegen.common.sharding import LOCAL, Sharding
from imagegen.common.text import encoder_trunk, ensure_fp32_rotary, take_masked

LATENT_CHANNELS = 16
VAE_SCALE = 8  # 2 ** len(temperal_downsample)
PATCH_MULTIPLE = VAE_SCALE * 2  # pixels per packed token side

T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:"
)
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate."
)
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
# Bump when anything that changes prompt embeddings for the same inputs changes (it is part of cache keys).
TEMPLATE_VERSION = "qwen-1"


def _template(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class QwenVariant:
    name: str
    system: str
    drop_tokens: int  # template tokens the pipeline drops from the front of the embeddings
    picture_labels: bool  # Edit-Plus labels each image slot "Picture k: "
    truncate_embeddings: bool  # text-to-image cuts embeddings to max_sequence_length; edits do not
    vl_area: int | None  # pixel area each input image is resized to for the vision-language encoder
    vae_area: int | None  # pixel area each input image is resized to for the VAE

    @property
    def is_edit(self) -> bool:
        return self.vae_area is not None

    def user_text(self, prompt: str, num_images: int) -> str:
        if not self.is_edit:
            return prompt
        if self.picture_labels:
            return "".join(f"Picture {k + 1}: {IMAGE_SLOT}" for k in range(num_images)) + prompt
        return IMAGE_SLOT + prompt


VARIANTS = {
    "qwen-image": QwenVariant("qwen-image", T2I_SYSTEM, 34, False, True, None, None),
    "qwen-image-edit": QwenVariant("qwen-image-edit", EDIT_SYSTEM, 64, False, False, 1024 * 1024, 1024 * 1024),
    "qwen-image-edit-plus": QwenVariant("qwen-image-edit-plus", EDIT_SYSTEM, 64, True, False, 384 * 384, 1024 * 1024),
}

_COMMON_DEFAULTS = dict(steps=50, guidance_scale=4.0, max_sequence_length=512, max_sequence_length_limit=1024)
DEFAULTS = {
    # One step makes the terminal stretch of the schedule divide by zero (NaN image): at least 2.
    "qwen-image": FamilyDefaults(size=1024, min_steps=2, **_COMMON_DEFAULTS),
    "qwen-image-edit": FamilyDefaults(size=None, min_steps=2, min_images=1, max_images=1, **_COMMON_DEFAULTS),
    "qwen-image-edit-plus": FamilyDefaults(size=None, min_steps=2, min_images=1, max_images=4, **_COMMON_DEFAULTS),
}

_image_processor = VaeImageProcessor(vae_scale_factor=PATCH_MULTIPLE)


# ---------------------------------------------------------------------------------------------------- geometry
def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels with aspect `ratio`, each a multiple of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


@dataclass(frozen=True)
class EditGeometry:
    """Where each input image goes: sizes for the VL encoder and the VAE, and the default output size."""

    vl_sizes: list[tuple[int, int]]  # (width, height) per image
    vae_sizes: list[tuple[int, int]]
    default_size: tuple[int, int]  # (width, height), already a multiple of 16


def edit_geometry(variant: QwenVariant, image_sizes: list[tuple[int, int]]) -> EditGeometry:
    vl = [calculate_dimensions(variant.vl_area, w / h) for w, h in image_sizes]
    vae = [calculate_dimensions(variant.vae_area, w / h) for w, h in image_sizes]
    # Edit sizes the output from its (only) image, Edit-Plus from the last one; both at 1024^2 area.
    ref_w, ref_h = image_sizes[-1]
    out_w, out_h = calculate_dimensions(1024 * 1024, ref_w / ref_h)
    default = (out_w // PATCH_MULTIPLE * PATCH_MULTIPLE, out_h // PATCH_MULTIPLE * PATCH_MULTIPLE)
    return EditGeometry(vl, vae, default)


def default_size(family: str, image_sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    variant = VARIANTS[family]
    return edit_geometry(variant, image_sizes).default_size if variant.is_edit and image_sizes else None


def token_grid(width: int, height: int) -> tuple[int, int, int]:
    """`img_shapes` entry (frames, token rows, token cols) of an image of `width` x `height` pixels."""
    return 1, height // PATCH_MULTIPLE, width // PATCH_MULTIPLE


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
        return [_image_processor.resize(im, h, w) for im, (w, h) in zip(images, sizes, strict=True)]

    @torch.no_grad()
    def encode(self, prompt: str, images: list[PIL.Image.Image], max_sequence_length: int) -> torch.Tensor:
        text = _template(self.variant.system, self.variant.user_text(prompt, len(images)))
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


# --------------------------------------------------------------------------------------------------------- vae
class QwenVae:
    """Edit images -> packed condition latents; final packed latents -> images in [-1, 1]."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self._setup(folder.load("vae", dtype, device), folder.family)

    @classmethod
    def from_module(cls, vae: torch.nn.Module, family: str) -> QwenVae:
        """Over an already-built VAE (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(vae, family)
        return stage

    def _setup(self, vae: torch.nn.Module, family: str) -> None:
        self.variant = VARIANTS[family]
        self.vae = vae
        self.device = vae.device
        self.dtype = self.vae.dtype
        config = self.vae.config
        self._mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        self._std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)

    @torch.no_grad()
    def encode_condition(self, images: list[PIL.Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """Packed `[1, S_cond, 64]` latents of every image (concatenated) and their `img_shapes` entries."""
        sizes = edit_geometry(self.variant, [im.size for im in images]).vae_sizes
        packed, shapes = [], []
        for image, (width, height) in zip(images, sizes, strict=True):
            pixels = _image_processor.preprocess(image, height, width).unsqueeze(2)
            pixels = pixels.to(device=self.device, dtype=self.dtype)
            latents = self.vae.encode(pixels).latent_dist.mode()
            mean = self._mean.to(latents.device, latents.dtype)
            std = self._std.to(latents.device, latents.dtype)
            latents = (latents - mean) / std
            packed.append(patchify(latents[:, :, 0], channel_last=False))
            shapes.append(token_grid(width, height))
        return torch.cat(packed, dim=1), shapes

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Packed `[K, S, 64]` -> images `[K, 3, H, W]` in [-1, 1] (before postprocessing)."""
        grid = unpatchify(latents, 2 * (height // PATCH_MULTIPLE), 2 * (width // PATCH_MULTIPLE), channel_last=False)
        grid = grid.unsqueeze(2).to(device=self.device, dtype=self.dtype)
        inv_std = 1.0 / self._std.to(grid.device, grid.dtype)
        grid = grid / inv_std + self._mean.to(grid.device, grid.dtype)
        return self.vae.decode(grid, return_dict=False)[0][:, :, 0]


# -------------------------------------------------------------------------------------------------- DiT forward
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
    """Output projections, gated residuals, norm2 + modulation and the MLPs of both streams. `rows` is the
    attention output: one `[B, S + L, H, D]` tensor, or one `[1, S + L_b, H, D]` per batch row."""
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
    its matmul's epilogue (`imagegen.common.fused`), and the blocks' timestep modulations are computed for every step of
    a request at once (`modulations`), so their 7 GB of weights are read once per request, not once per step."""

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


# ------------------------------------------------------------------------------------------------------ denoise
def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent (rows, cols) of the noisy image: 2 * (pixels // 16)."""
    return 2 * (height // PATCH_MULTIPLE), 2 * (width // PATCH_MULTIPLE)


def noise_for(seed: int, num_images: int, width: int, height: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's draw: `[K, 1, 16, h, w]` in the model dtype from a CPU generator, packed to `[K, S, 64]`."""
    rows, cols = latent_grid(width, height)
    noise = initial_noise(seed, (num_images, 1, LATENT_CHANNELS, rows, cols), dtype)
    return patchify(noise[:, 0], channel_last=False)


def schedule_for(scheduler_config: dict, steps: int, width: int, height: int) -> Schedule:
    rows, cols = latent_grid(width, height)
    return make_schedule(scheduler_config, np.linspace(1.0, 1 / steps, steps), (rows // 2) * (cols // 2))


class QwenDenoiser(DenoiseStage):
    """The denoise stage: initial noise -> final packed latents, with true CFG when the job has a negative.

    Under sequence parallelism (`sharding`) each rank holds a contiguous block of the noisy tokens and of each
    edit image's tokens; the latents stay sharded through the loop (CFG and the Euler step are per token) and
    are gathered once at the end. With CFG-parallel ranks each computes one branch and they swap outputs.
    """

    dit_class = QwenDiT
    fast_class = QwenFastDiT

    @torch.no_grad()
    def run_batch(
        self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding = LOCAL
    ) -> list[torch.Tensor | BaseException]:
        check_batch(jobs)
        if self.uses_fast_path(sharding):
            return self._run_fast(jobs, hooks, sharding)
        return self._run_reference(jobs, hooks, sharding)

    def _noises(self, jobs: list[DenoiseJob]) -> list[torch.Tensor]:
        return [noise_for(o.seed, o.num_images, o.width, o.height, self.dtype) for o in (j.options for j in jobs)]

    def _run_reference(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        """Every member's rows of one branch in one forward (members in order, each its num_images rows)."""
        first = jobs[0]
        opts = first.options
        noises = self._noises(jobs)
        counts = [n.shape[0] for n in noises]
        schedule = schedule_for(self.scheduler_config, opts.steps, opts.width, opts.height).to(self.device)
        img_shapes = [token_grid(opts.width, opts.height), *first.condition_shapes]
        plan = sharding.plan(tuple(f * h * w for f, h, w in img_shapes))
        layout_rows = plan.local_index
        noisy_rows = plan.segment_rows(0).to(self.device)
        latent_lengths = [end - start for start, end in (plan.segment_range(0, r) for r in range(plan.world))]

        # The local DiT input is this rank's rows of [noise, edit images]; the noisy rows change every step.
        def local_input(job: DenoiseJob, noise: torch.Tensor) -> torch.Tensor:
            if job.condition_latents is None:
                return plan.take_local(noise).to(self.device)
            condition = job.condition_latents.to(noise.device, self.dtype).expand(noise.shape[0], -1, -1)
            return plan.take_local(torch.cat([noise, condition], dim=1)).to(self.device)

        inputs = [local_input(job, noise) for job, noise in zip(jobs, noises, strict=True)]
        start, end = plan.segment_range(0)
        latents = [noise[:, start:end].to(self.device) for noise in noises]
        modulate_index = None
        if self.dit.zero_cond_t:
            modulate_index = (plan.local_segment > 0).int().to(self.device)[None]

        backend = sharding.attention(plan)
        names = ["positive"] if first.negative_embeds is None else ["positive", "negative"]
        fields = {"positive": "prompt_embeds", "negative": "negative_embeds"}

        def branch_forward(text: torch.Tensor, layout: AttentionLayout, index: torch.Tensor | None):
            def forward(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                return self.dit(model_input, text, timestep, layout, index).index_select(1, noisy_rows)

            return maybe_graphed(forward, self.device, self.settings.cuda_graphs)

        def setup(active: tuple[int, ...]):
            """The active members' stacked inputs and one forward per local branch."""
            member_counts = [counts[m] for m in active]
            rows = sum(member_counts)
            index = None if modulate_index is None else modulate_index.expand(rows, -1)
            forwards = {}
            for name in sharding.branches(names):
                embeds = [getattr(jobs[m], fields[name]) for m in active]
                lengths = [e.shape[0] for e in embeds]
                longest = max(lengths)
                text = stack_padded([e.to(self.device, self.dtype) for e in embeds], member_counts, longest)
                image_rotary, text_rotary = qwen_rotary(self.dit.transformer, img_shapes, longest)
                layout = AttentionLayout(
                    backend,
                    image_rotary.index(layout_rows).to(self.device),
                    text_rotary.to(self.device),
                    replicated_lengths=row_lengths(lengths, member_counts),
                )
                forwards[name] = branch_forward(text, layout, index)
            return torch.cat([inputs[m] for m in active]), forwards, member_rows(member_counts)

        setups: dict[tuple[int, ...], tuple] = {}

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            if active not in setups:
                setups.clear()  # a member left: the old stacking is never used again
                setups[active] = setup(active)
            stacked_input, forwards, bounds = setups[active]
            batched = torch.cat(latents)
            # One timestep row for all: the time embedding and every block's modulation are computed once and
            # broadcast, so no row's arithmetic depends on how many rows share the forward.
            timestep = schedule.timesteps[step : step + 1].to(batched.dtype) / 1000
            model_input = stacked_input.index_copy(1, noisy_rows, batched)
            outputs = {name: forward(model_input, timestep) for name, forward in forwards.items()}
            outputs = sharding.exchange(outputs, names)
            velocities = []
            for member, (lo, hi) in zip(active, bounds, strict=True):
                mine = [out[lo:hi] for out in outputs]
                if hooks[member].on_model_output is not None:
                    for name, out in zip(names, mine, strict=True):
                        hooks[member].model_output(step, name, sharding.gather(out, latent_lengths))
                guidance = jobs[member].options.guidance_scale
                velocities.append(mine[0] if len(mine) == 1 else qwen_true_cfg(mine[0], mine[1], guidance))
            return velocities

        results = run_batch_loop(predict, latents, schedule, hooks, sharding)
        return [r if isinstance(r, BaseException) else sharding.gather(r, latent_lengths) for r in results]

    def _run_fast(self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding) -> list:
        """Every local CFG branch of every member in one batched forward (branch-major rows, members in order
        within a branch), replayed from `self.graphs`."""
        first = jobs[0]
        opts = first.options
        device, dtype = self.device, self.dtype
        noises = self._noises(jobs)
        counts = [n.shape[0] for n in noises]
        schedule = schedule_for(self.scheduler_config, opts.steps, opts.width, opts.height).to(device)
        img_shapes = [token_grid(opts.width, opts.height), *first.condition_shapes]
        names = ["positive"] if first.negative_embeds is None else ["positive", "negative"]
        local = sharding.branches(names)
        fields = {"positive": "prompt_embeds", "negative": "negative_embeds"}
        segment_sizes = torch.tensor([f * h * w for f, h, w in img_shapes])
        segment_of_row = torch.repeat_interleave(torch.arange(len(img_shapes)), segment_sizes)
        compile = self.compile_for(opts.steps * len(local))
        timesteps = schedule.timesteps.to(dtype) / 1000
        img_mods, txt_mods = self.fast.modulations(timesteps)

        def setup(active: tuple[int, ...]):
            member_counts = [counts[m] for m in active]
            row_embeds = [getattr(jobs[m], fields[name]) for name in local for m in active for _ in range(counts[m])]
            lengths = tuple(e.shape[0] for e in row_embeds)
            longest = max(lengths)
            image_rotary, text_rotary = qwen_rotary(self.fast.transformer, img_shapes, longest)
            rows = len(row_embeds)
            if first.condition_latents is None:
                condition = torch.zeros(rows, 0, noises[0].shape[2], dtype=dtype, device=device)
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

            return inputs, forward, ("qwen", lengths, compile), member_rows(member_counts)

        setups: dict[tuple[int, ...], tuple] = {}

        def predict(active: tuple[int, ...], latents: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            if active not in setups:
                setups.clear()
                setups[active] = setup(active)
            inputs, forward, key, bounds = setups[active]
            batched = torch.cat(latents).repeat(len(local), 1, 1)
            step_args = (timesteps[step : step + 1], img_mods[step], txt_mods[step])
            out = self.graphs.run(key, forward, batched, *step_args, *inputs.tensors())
            outputs = sharding.exchange(dict(zip(local, out.chunk(len(local)), strict=True)), names)
            velocities = []
            for member, (lo, hi) in zip(active, bounds, strict=True):
                mine = [output[lo:hi] for output in outputs]
                for name, output in zip(names, mine, strict=True):
                    hooks[member].model_output(step, name, output)
                guidance = jobs[member].options.guidance_scale
                velocities.append(mine[0] if len(mine) == 1 else qwen_true_cfg(mine[0], mine[1], guidance))
            return velocities

        results = run_batch_loop(predict, [n.to(device) for n in noises], schedule, hooks, sharding)
        if compile:
            self.compiled_forward_ran()
        return results


def warmup_jobs(family: str, width: int, height: int, config: dict) -> list[DenoiseJob]:
    """Two-step jobs that trace every shape class a request of this size meets (`imagegen.common.warmup`): CFG with
    prompts of different lengths, and no CFG; edits carry one condition image of the output's size."""
    generator = torch.Generator().manual_seed(0)
    dim = config.get("joint_attention_dim", 3584)

    def embeds(length: int) -> torch.Tensor:
        return torch.randn(length, dim, generator=generator) * 0.1

    condition, shapes = None, []
    if VARIANTS[family].is_edit:
        shapes = [token_grid(width, height)]
        condition = torch.randn(1, math.prod(shapes[0]), config.get("in_channels", 64), generator=generator)

    def options(negative: str | None) -> ResolvedOptions:
        return ResolvedOptions(family, "warm-up", negative, width, height, 2, 4.0, 0.0, 1.0, 512, 0, 1, len(shapes))

    return [
        DenoiseJob(options(" "), embeds(24), embeds(11), condition, shapes),
        DenoiseJob(options(None), embeds(24), None, condition, shapes),
    ]
