"""Tiny random-weight diffusers checkpoints of the real Qwen-Image / Qwen-Image-Edit(-Plus) / Z-Image classes.

The folders are written with ``save_pretrained`` exactly like the published repositories, so tests exercise the real
loading code. Weights are drawn so that every code path matters (no zero gates, no unit norms): a wrong mask,
position or prompt changes the output visibly.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable

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
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from torch import nn
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
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Bump whenever the bytes written change: it is part of the cache folder name.
BUILDER_VERSION = 2
Z_DIT_HEADS, Z_DIT_HEAD_DIM = 4, 24

FAMILIES = ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "z-image", "qwen-image-2.1")
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
TARGET_VOCAB = 900

# --- tokenizer ----------------------------------------------------------------------------------------------------
# Added tokens in Qwen's id order (they follow the BPE vocabulary). True = special (skipped when decoding).
_QWEN25_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_ADDED = _QWEN25_ADDED + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Minimal Qwen3-style chat template: string contents, generation prompt, and the enable_thinking switch
# (False pre-fills an empty think block, as the real Qwen3 template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Everyday caption vocabulary so ordinary prompts get word-sized tokens; anything else falls back to bytes.
_ENGLISH = """
a an the of in on at to from with without by for and or but not no yes is are was be this that these those it its
red orange yellow green blue purple pink brown black white gray grey golden silver dark light bright pale colorful
fox cat dog horse bird fish owl wolf bear lion tiger rabbit deer cow sheep duck eagle butterfly dragon robot person
man woman child girl boy people face hair eyes hand smile portrait astronaut knight wizard chef farmer
snow rain sun moon star stars sky cloud clouds fog storm sunset sunrise night day morning evening winter summer
mountain mountains river lake sea ocean beach island forest tree trees flower flowers garden field grass desert
city street road bridge house castle tower building room kitchen window door table chair book lamp car train boat
photo photograph painting drawing sketch illustration poster cartoon anime watercolor oil render cinematic
realistic detailed sharp soft blurry high quality style lighting shadow background foreground center left right
top bottom small large big tiny huge tall short long round square old new young happy sad quiet
sitting standing running walking flying swimming sleeping holding looking wearing reading playing eating
hat coat dress shirt glasses umbrella cup coffee tea bread apple cake pizza sign logo words letter letters
change make turn add remove replace keep put into over under behind front next near far above below inside
one two three four five six seven eight nine ten first second picture pictures image images scene view
"""


def _template_chunks() -> list[str]:
    """Literal text of the diffusers prompt templates (and the Z-Image chat frame), split at special tokens."""
    pipelines = (
        _bare_pipeline(QwenImagePipeline),
        _bare_pipeline(QwenImageEditPipeline),
        _bare_pipeline(QwenImageEditPlusPipeline),
    )
    texts = [p.prompt_template_encode.replace("{}", "") for p in pipelines]
    texts += ["Picture 1: Picture 2: Picture 3: ", "system\nuser\nassistant\n"]
    return [chunk for text in texts for chunk in re.split(r"<\|[a-z_]+\|>", text) if chunk]


def _bare_pipeline(cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    """A component-less pipeline, only to read the template attributes the real __init__ sets."""
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    return cls(**dict.fromkeys(names, None))


@functools.cache
def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with Qwen2's pre-tokenizer. The templates are weighted far above everything else, so each of
    their pre-tokens merges into one token and the hard-coded drop counts (34 / 64) hold."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB - len(_QWEN3_ADDED),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text tokenizes
        show_progress=False,
    )
    words = _ENGLISH.split()
    corpus = _template_chunks() * 1000 + [" ".join(words)] * 10 + [w.capitalize() for w in words]
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    merges = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    return vocab, merges


def _make_tokenizer(added: tuple[tuple[str, bool], ...], chat_template: str | None = None) -> Qwen2Tokenizer:
    """A fresh Qwen2Tokenizer on the trained BPE (never shared between pipelines: saving the Edit processor
    rewrites its tokenizer's settings)."""
    vocab, merges = _trained_bpe()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=131072)
    # Insert in Qwen order so ids follow the BPE vocabulary exactly as in the real files.
    for text, special in added:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens([token])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    if chat_template is not None:
        tok.chat_template = chat_template
    _check_added_ids(tok, vocab, added)
    return tok


def _check_added_ids(tok: Qwen2Tokenizer, vocab: dict[str, int], added: tuple[tuple[str, bool], ...]) -> None:
    for offset, (text, _) in enumerate(added):
        if tok.convert_tokens_to_ids(text) != len(vocab) + offset:
            raise RuntimeError(f"added token {text!r} did not get Qwen's id order")


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


# --- weight init --------------------------------------------------------------------------------------------------
_CONV_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Query/key RMSNorm scales (diffusers norm_q / norm_added_k, Qwen3 q_norm / k_norm). Scales around 1 leave attention
# almost uniform, so the ~10 prompt tokens among ~8000 Edit-Plus condition tokens barely register (the prompt moved
# the image by < 1e-3); 1.5 sharpens attention, as trained models are, and lifts that to ~2e-2.
QK_NORM_MEAN = 1.5
_QK_NORM = re.compile(r"(^|\.)(norm_(added_)?[qk]|[qk]_norm)\.weight$")


def _randn_(param: nn.Parameter, gen: torch.Generator, std: float, mean: float = 0.0) -> None:
    param.data.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std + mean)


@torch.no_grad()
def randomise_weights_(model: nn.Module, seed: int) -> None:
    """Redraw every parameter from a generator seeded with ``seed``: Linear/Conv weights N(0, 1/fan_in),
    embeddings N(0, 1), learned pad tokens N(0, 1); constructor constants (norm scales = 1, biases = 0) get
    +-0.1 noise so that nothing hides behind an exact 0 or 1 (query/key norm scales are centred on QK_NORM_MEAN)."""
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, _CONV_TYPES):
            _randn_(module.weight, gen, 1.0 / math.sqrt(module.weight[0].numel()))
            done.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            _randn_(module.weight, gen, 1.0)
            done.add(id(module.weight))
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if name.endswith("pad_token"):
            _randn_(param, gen, 1.0)
        elif name.endswith("bias") or bool((param == 0).all()):
            _randn_(param, gen, 0.1)
        elif bool((param == 1).all()):
            _randn_(param, gen, 0.1, mean=QK_NORM_MEAN if _QK_NORM.search(name) else 1.0)
        else:
            raise RuntimeError(f"{type(model).__name__}.{name}: unexpected constructor init, extend the rules")


def _seeded(seed: int, offset: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Construct under a fixed global seed (constructors draw from it) without disturbing the caller's RNG,
    then redraw all weights from a per-component generator."""
    component_seed = seed * 1000 + offset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed)
        model = build()
    randomise_weights_(model, component_seed)
    return model.eval()


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


def _qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        time_shift_type="exponential",
        shift_terminal=0.02,
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
    return out


def _cache_root(cache_dir: str | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    base = os.environ.get("IMAGEGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imagegen")
    return pathlib.Path(base) / "tiny"


def tiny_checkpoint_cached(
    family: str, variant: str | None = None, seed: int = 0, cache_dir: str | None = None, heads: int | None = None
) -> pathlib.Path:
    """Build once into ``cache_dir`` (default ``$IMAGEGEN_CACHE/tiny``, else ``~/.cache/imagegen/tiny``) and return
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
