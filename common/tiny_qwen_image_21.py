"""A tiny random-weight Qwen-Image-2.1 checkpoint of the real diffusers / transformers classes.

`QwenImage21Pipeline` = `QwenImage21Transformer2DModel` + `AutoencoderKLQwenImage21` (RGBA in and out, 64 latent
channels, 16x) + `Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor` + `FlowMatchEulerDiscreteScheduler`, saved
with `save_pretrained` so that `from_pretrained` reads it offline like the published folder. The tokenizer, the
weight draw and the scheduler come from `imagegen.common.tiny` (see docs/tiny-checkpoints.md); this module only adds
the 2.1 shapes. Variant "turbo" stores a `sample_sigmas` grid in model_index.json, as the Turbo checkpoint does
(the regular pipeline reads it and ignores `num_inference_steps`).
"""

from __future__ import annotations

import os
import pathlib

import torch
from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline, QwenImage21Transformer2DModel
from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from imagegen.common.tiny_parts import _QWEN3_ADDED, _make_tokenizer, _qwen_scheduler, _seeded

VARIANTS = (None, "turbo")
TEXT_HIDDEN = 48  # Qwen3-VL text width == the DiT's context_in_dim; differs from the DiT width on purpose
DIT_HEADS = 4  # divisible by 2 and 4 for Ulysses; `heads=6` builds one that 4 ranks cannot split
DIT_HEAD_DIM = 16
LATENT_CHANNELS = 64  # VAE z_dim == the DiT's in/out channels (the pipeline reads both)
# A short Turbo-style grid (the real Turbo ships 8 values; ours keeps CPU runs short). Excludes the terminal 0.
TURBO_SIGMAS = [1.0, 0.9, 0.6]
# Vision tiles are 32x32 pixels (patch 16, merge 2); one vision slot stands for 2x2 latent tokens.
VISION_MIN_PIXELS = 32 * 32
VISION_MAX_PIXELS = 4096 * 4096  # the real maximum: the ~1 MP images the pipeline sizes are never resized again

# Qwen3-VL's chat template reduced to what the pipeline renders (system turn with text items, for `_drop_idx`).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _processor() -> Qwen3VLProcessor:
    pixels = {"shortest_edge": VISION_MIN_PIXELS, "longest_edge": VISION_MAX_PIXELS}
    # Qwen3-VL's preprocessor values (mean/std 0.5), except a smaller minimum area: the real 65536 (256^2) would
    # upscale a 64x64 condition image and break the one-slot-per-2x2-latent-tokens match the pipeline checks.
    vision = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    vision.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **vision),
        tokenizer=_make_tokenizer(_QWEN3_ADDED),
        video_processor=Qwen3VLVideoProcessor(**vision),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _text_encoder(seed: int, processor: Qwen3VLProcessor) -> Qwen3VLForConditionalGeneration:
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": len(tok),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        # 8 rotary frequencies interleaved over (temporal, height, width) like the real [24, 20, 20] of 64
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": TEXT_HIDDEN,
        "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated per image like the real 48x48
        "deepstack_visual_indexes": [0],  # vision block 0 feeds text layer 0, as the real (8, 16, 24) feed 0..2
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return _seeded(seed, 21, lambda: Qwen3VLForConditionalGeneration(config))


def _transformer(seed: int, heads: int) -> QwenImage21Transformer2DModel:
    return _seeded(
        seed,
        22,
        lambda: QwenImage21Transformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=DIT_HEAD_DIM,
            num_attention_heads=heads,
            context_in_dim=TEXT_HIDDEN,
            mlp_ratio=3,
            axes_dims_rope=(4, 6, 6),  # frame axis narrower than height/width, as the real (16, 56, 56)
            causal_condition=True,
        ),
    )


def _vae(seed: int) -> AutoencoderKLQwenImage21:
    # Five levels keep the real 16x spatial factor; a decoder wider than the encoder as in the real (96 / 144).
    return _seeded(
        seed,
        23,
        lambda: AutoencoderKLQwenImage21(
            base_dim=8,
            decoder_base_dim=12,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True, True],
        ),
    )


def check_system_prefix(pipe: QwenImage21Pipeline) -> int:
    """The pipeline drops `_drop_idx` leading tokens, counted on the system turn alone: raise unless they are
    exactly the first tokens of a full rendered prompt (else a tiny tokenizer would merge across the boundary)."""
    tokenizer = pipe.processor.tokenizer
    full = tokenizer(pipe.prompt_template_t2i.format("a red fox")).input_ids
    system = tokenizer(pipe.prompt_template_t2i[: pipe.prompt_template_t2i.index("<|im_start|>user")]).input_ids
    if full[: len(system)] != system or len(system) != pipe._drop_idx:
        raise RuntimeError(f"system turn is {len(system)} tokens, pipeline drops {pipe._drop_idx}")
    return pipe._drop_idx


@torch.no_grad()
def _check_vae_spread(vae: AutoencoderKLQwenImage21, seed: int = 0) -> None:
    """Random VAEs easily decode to saturated images; refuse to write one (it would hide decode bugs)."""
    latents = torch.randn(1, LATENT_CHANNELS, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    image = vae.decode(latents * std + mean).sample
    saturated = (image.abs() >= 1.0).float().mean().item()
    if image.shape[1] != 4 or not torch.isfinite(image).all() or image.std().item() < 0.1 or saturated > 0.25:
        raise RuntimeError(f"unhealthy tiny VAE decode (std {image.std():.3f}, {saturated:.0%} clipped)")


def build_qwen_image_21_pipeline(seed: int = 0, *, variant: str | None = None, heads: int = DIT_HEADS):
    """The in-memory pipeline (float32, eval mode) that `build_qwen_image_21` saves, after the sanity checks."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for qwen-image-2.1; expected one of {VARIANTS}")
    processor = _processor()
    pipe = QwenImage21Pipeline(
        scheduler=_qwen_scheduler(),
        vae=_vae(seed),
        text_encoder=_text_encoder(seed, processor),
        processor=processor,
        transformer=_transformer(seed, heads),
        sample_sigmas=list(TURBO_SIGMAS) if variant == "turbo" else None,
    )
    check_system_prefix(pipe)
    _check_vae_spread(pipe.vae)
    return pipe


def build_qwen_image_21(
    out_dir: str | os.PathLike, seed: int = 0, *, variant: str | None = None, heads: int = DIT_HEADS
) -> pathlib.Path:
    """Write a complete diffusers-format Qwen-Image-2.1 folder into `out_dir` and return its path. `heads` sets the
    DiT's head count (head dim 16: the width is 16 * heads)."""
    pipe = build_qwen_image_21_pipeline(seed, variant=variant, heads=heads)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
