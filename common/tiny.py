"""Tiny random-weight diffusers checkpoints of the real Qwen-Image / Qwen-Image-Edit(-Plus) / Z-Image classes (and,
through `tiny_qwen_image_21`, Qwen-Image-2.1).

The folders are written with ``save_pretrained`` exactly like the published repositories, so tests exercise the real
loading code. Weights are drawn so that every code path matters (no zero gates, no unit norms): a wrong mask,
position or prompt changes the output visibly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3Model,
)

from imagegen.common.families import FAMILIES as FAMILY_TABLE
from imagegen.common.model_defaults import write_model_defaults
from imagegen.common.options import ModelDefaults
from imagegen.common.stage_settings import DEFAULT_CACHE_ROOT
from imagegen.common.tiny_parts import (
    _QWEN3_ADDED,
    _QWEN25_ADDED,
    QWEN3_CHAT_TEMPLATE,
    _make_tokenizer,
    _qwen_scheduler,
    _seeded,
)

# Bump whenever the bytes written change: it is part of the cache folder name.
BUILDER_VERSION = 3
# The deployment defaults (`imagegen.json`) a variant's folder carries: Z-Image-Turbo is distilled for 8 steps
# without CFG (as its model card runs it). Published Turbo folders carry none: their operator sets them.
# Qwen-Image-2.1 Turbo needs none: its sigma grid (model_index.json) fixes the steps, and guidance 1.0 is off.
MODEL_DEFAULTS = {("z-image", "turbo"): ModelDefaults(steps=8, guidance_scale=0.0)}
Z_DIT_HEADS, Z_DIT_HEAD_DIM = 4, 24

FAMILIES = tuple(FAMILY_TABLE)
# The tiny checkpoints of each family: the plain one, and those of a real checkpoint variant that changes the
# arithmetic (Edit-2511's `zero_cond_t`, Z-Image-Turbo's scheduler shift, Qwen-Image-2.1 Turbo's sigma grid).
VARIANTS: dict[str, tuple[str | None, ...]] = {
    "qwen-image": (None,),
    "qwen-image-edit": (None,),
    "qwen-image-edit-plus": (None, "2511"),
    "z-image": (None, "turbo"),
    "qwen-image-2.1": (None, "turbo"),  # built by `imagegen.common.tiny_qwen_image_21`
}

# --- sizes --------------------------------------------------------------------------------------------------------
QWEN_TEXT_HIDDEN = 64  # Qwen2.5-VL text hidden size == QwenImage joint_attention_dim
QWEN3_HIDDEN = 48  # differs from the DiT dim and from its own heads*head_dim, as in the real Qwen3-4B
DIT_HEADS = 4  # divisible by 2 and 4 for Ulysses
DIT_HEAD_DIM = 16
VISION_MAX_PIXELS = 64 * 28 * 28  # <= 64 vision tokens per image keeps CPU runs fast
VISION_MIN_PIXELS = 4 * 28 * 28


def check_template_token_counts(pipe: DiffusionPipeline) -> int:
    """Count the tokens of the pipeline's template prefix through '<|im_start|>user\\n' and raise unless it equals
    the number of tokens the pipeline drops. Returns the count."""
    marker = "<|im_start|>user\n"
    template = pipe.prompt_template_encode
    prefix = template[: template.index(marker) + len(marker)]
    tokenizer = getattr(pipe, "processor", None) or pipe.tokenizer
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    count = len(tokenizer(prefix).input_ids)
    expected = pipe.prompt_template_encode_start_idx
    if count != expected:
        raise RuntimeError(f"{type(pipe).__name__}: template prefix is {count} tokens, pipeline drops {expected}")
    return count


# --- Qwen-Image components ----------------------------------------------------------------------------------------
def _qwen_text_encoder(seed: int, tok: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": len(tok),
        "hidden_size": QWEN_TEXT_HIDDEN,
        "intermediate_size": 2 * QWEN_TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width) like the real (16, 24, 24)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,  # head dim 16: divisible by 4 for the 2D axial rotary
        "out_hidden_size": QWEN_TEXT_HIDDEN,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],  # block 0 windowed, block 1 full, like the real interleave
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return _seeded(seed, 1, lambda: Qwen2_5_VLForConditionalGeneration(config))


def _qwen_transformer(seed: int, zero_cond_t: bool, heads: int = DIT_HEADS) -> QwenImageTransformer2DModel:
    return _seeded(
        seed,
        2,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=DIT_HEAD_DIM,
            num_attention_heads=heads,
            joint_attention_dim=QWEN_TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),
            zero_cond_t=zero_cond_t,
        ),
    )


def _qwen_vae(seed: int) -> AutoencoderKLQwenImage:
    # dim_mult of length 4 with three temporal flags keeps the real 8x spatial factor; latents_mean/std stay default.
    # base_dim 8, not less: thinner 3D convs fall off PyTorch's oneDNN path and the ~1 MP Edit encode gets slower.
    return _seeded(
        seed,
        3,
        lambda: AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
    )


def _qwen_processor() -> Qwen2VLProcessor:
    pixels = {"min_pixels": VISION_MIN_PIXELS, "max_pixels": VISION_MAX_PIXELS}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels),
        tokenizer=_make_tokenizer(_QWEN25_ADDED),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels),
    )


def _qwen_components(seed: int, zero_cond_t: bool = False, heads: int = DIT_HEADS) -> dict[str, object]:
    tokenizer = _make_tokenizer(_QWEN25_ADDED)
    return {
        "scheduler": _qwen_scheduler(),
        "vae": _qwen_vae(seed),
        "text_encoder": _qwen_text_encoder(seed, tokenizer),
        "tokenizer": tokenizer,
        "transformer": _qwen_transformer(seed, zero_cond_t, heads),
    }


# --- Z-Image components -------------------------------------------------------------------------------------------
def _z_text_encoder(seed: int, tok: Qwen2Tokenizer) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=QWEN3_HIDDEN,
        intermediate_size=2 * QWEN3_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=True,
    )
    return _seeded(seed, 11, lambda: Qwen3Model(config))


# Z-Image keeps dim 96 whatever the head count (see below); RoPE axes must add up to the head dim.
_Z_AXES_BY_HEAD_DIM = {24: [8, 8, 8], 16: [4, 6, 6]}


def _z_transformer(seed: int, heads: int = Z_DIT_HEADS) -> ZImageTransformer2DModel:
    head_dim = Z_DIT_HEADS * Z_DIT_HEAD_DIM // heads
    return _seeded(
        seed,
        12,
        lambda: ZImageTransformer2DModel(
            in_channels=16,
            # dim 96 makes the SwiGLU hidden width int(96 / 3 * 8) = 256: a multiple of the CPU's vector
            # width, so elementwise kernels split rows identically whatever the sequence length (with dim 64
            # the width 170 made sequence-parallel runs differ from one process by float rounding).
            dim=Z_DIT_HEADS * Z_DIT_HEAD_DIM,
            n_layers=2,
            n_refiner_layers=2,
            n_heads=heads,
            n_kv_heads=heads,
            cap_feat_dim=QWEN3_HIDDEN,
            axes_dims=_Z_AXES_BY_HEAD_DIM[head_dim],
            axes_lens=[1024, 512, 512],  # axis 0 carries caption positions: 512 tokens + padding fit
        ),
    )


def _z_vae(seed: int) -> AutoencoderKL:
    # FLUX-style: four blocks (8x), 16 latent channels, no quant convs, FLUX/Z-Image scaling and shift.
    return _seeded(
        seed,
        13,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        ),
    )


def _z_scheduler(variant: str | None) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0 if variant == "turbo" else 6.0
    )


# --- pipelines ----------------------------------------------------------------------------------------------------
def _build_pipeline(family: str, seed: int, variant: str | None, heads: int | None = None) -> DiffusionPipeline:
    qwen_heads = heads or DIT_HEADS
    if family == "qwen-image":
        return QwenImagePipeline(**_qwen_components(seed, heads=qwen_heads))
    if family == "qwen-image-edit":
        return QwenImageEditPipeline(processor=_qwen_processor(), **_qwen_components(seed, heads=qwen_heads))
    if family == "qwen-image-edit-plus":
        components = _qwen_components(seed, zero_cond_t=variant == "2511", heads=qwen_heads)
        return QwenImageEditPlusPipeline(processor=_qwen_processor(), **components)
    tokenizer = _make_tokenizer(_QWEN3_ADDED, QWEN3_CHAT_TEMPLATE)
    return ZImagePipeline(
        scheduler=_z_scheduler(variant),
        vae=_z_vae(seed),
        text_encoder=_z_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        transformer=_z_transformer(seed, heads or Z_DIT_HEADS),
    )


def _validate(family: str, variant: str | None) -> None:
    if family not in VARIANTS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if variant not in VARIANTS[family]:
        raise ValueError(f"unknown variant {variant!r} for family {family!r}; expected one of {VARIANTS[family]}")


@torch.no_grad()
def decode_noise(pipe: DiffusionPipeline, seed: int = 0) -> torch.Tensor:
    """Decode N(0, 1) latents through the pipeline's own latent de-normalisation: [1, 3, 64, 64] image in about
    [-1, 1] (the Qwen VAE clamps to it, AutoencoderKL does not)."""
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    vae = pipe.vae
    if isinstance(vae, AutoencoderKLQwenImage):
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1)
        return vae.decode((latents * std + mean).unsqueeze(2)).sample[:, :, 0]
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample


def _check_vae_spread(pipe: DiffusionPipeline) -> None:
    """Random VAEs easily decode to all-black/all-white; that would hide decode bugs, so refuse to write one."""
    image = decode_noise(pipe)
    saturated = (image.abs() >= 1.0).float().mean().item()
    if not torch.isfinite(image).all() or image.std().item() < 0.1 or saturated > 0.25:
        raise RuntimeError(
            f"{type(pipe.vae).__name__}: unhealthy decode (std {image.std():.3f}, {saturated:.0%} clipped)"
        )


def build_tiny_pipeline(
    family: str, seed: int = 0, *, variant: str | None = None, heads: int | None = None
) -> DiffusionPipeline:
    """The in-memory pipeline that build_tiny_checkpoint saves (float32, eval mode), after the sanity checks.
    `heads` overrides the DiT's attention head count (e.g. 6, which 4 and 8 sequence-parallel ranks do not
    divide); the default is 4."""
    _validate(family, variant)
    if family == "qwen-image-2.1":  # Qwen3-VL and the RGBA VAE: its own builder, which runs its own checks
        from imagegen.common.tiny_qwen_image_21 import DIT_HEADS as QWEN21_HEADS
        from imagegen.common.tiny_qwen_image_21 import build_qwen_image_21_pipeline

        return build_qwen_image_21_pipeline(seed, variant=variant, heads=heads or QWEN21_HEADS)
    pipe = _build_pipeline(family, seed, variant, heads)
    if family != "z-image":
        check_template_token_counts(pipe)
    _check_vae_spread(pipe)
    return pipe


def build_tiny_checkpoint(
    family: str, out_dir: str | os.PathLike, seed: int = 0, *, variant: str | None = None, heads: int | None = None
) -> pathlib.Path:
    """Write a complete diffusers-format folder for ``family`` into ``out_dir`` and return its path."""
    pipe = build_tiny_pipeline(family, seed, variant=variant, heads=heads)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    if (family, variant) in MODEL_DEFAULTS:
        write_model_defaults(out, MODEL_DEFAULTS[family, variant])
    return out


def _cache_root(cache_dir: str | None) -> pathlib.Path:
    """`cache_dir`, else `tiny/` under the default cache root (the CLI passes its --cache-dir's)."""
    return pathlib.Path(cache_dir) if cache_dir is not None else pathlib.Path(DEFAULT_CACHE_ROOT) / "tiny"


def tiny_checkpoint_cached(
    family: str, variant: str | None = None, seed: int = 0, cache_dir: str | None = None, heads: int | None = None
) -> pathlib.Path:
    """Build once into ``cache_dir`` (default ``~/.cache/imagegen/tiny``) and return
    ``<root>/<family>[-<variant>][-h<heads>]-s<seed>-v<BUILDER_VERSION>``. Concurrent callers (threads or processes)
    each build into a private temp folder and rename it into place; the first rename wins, the others discard
    their copy."""
    _validate(family, variant)
    root = _cache_root(cache_dir)
    name = f"{family}{f'-{variant}' if variant else ''}{f'-h{heads}' if heads else ''}-s{seed}-v{BUILDER_VERSION}"
    final = root / name
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build_tiny_checkpoint(family, tmp, seed, variant=variant, heads=heads)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
