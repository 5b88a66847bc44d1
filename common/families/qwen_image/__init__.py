"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509/2511): the facts, torch-free.

What the gateway, the client and the checks need without loading a model: the variants and their chat
templates, the defaults and limits, the geometry (sizes, token grids) and the checkpoint classes. The stages
are in `pipeline` (encode, VAE, prepare, the denoise loop), the DiT forwards in `dit` (reference) and
`dit_fast` (fast path). Read next to diffusers 0.42.1 `pipelines/qwenimage/pipeline_qwenimage{,_edit,_edit_plus}.py`
and `models/transformers/transformer_qwenimage.py`:

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

from imagegen.common.errors import InvalidArgument
from imagegen.common.options import FamilyDefaults

NAMES = ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus")
LATENT_CHANNELS = 16
VAE_SCALE = 8  # 2 ** len(temperal_downsample)
PATCH_MULTIPLE = VAE_SCALE * 2  # pixels per packed token side
MIN_RESIZED_SIDE = 32  # the edit geometry rounds sides to multiples of 32: 0 means the image cannot be resized
LORA_LOADER = "QwenImageLoraLoaderMixin"  # diffusers' mixin whose `lora_state_dict` reads community formats

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

# model_index.json's pipeline class -> family, and the classes each component may have (others are refused).
PIPELINE_CLASSES = {
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
    "QwenImageEditPlusPipeline": "qwen-image-edit-plus",
}
_COMPONENTS = {
    "transformer": {"QwenImageTransformer2DModel"},
    "vae": {"AutoencoderKLQwenImage"},
    "text_encoder": {"Qwen2_5_VLForConditionalGeneration"},
    "tokenizer": {"Qwen2Tokenizer", "Qwen2TokenizerFast"},
    "scheduler": {"FlowMatchEulerDiscreteScheduler"},
}
_PROCESSOR = {"processor": {"Qwen2VLProcessor", "Qwen2_5_VLProcessor"}}
COMPONENT_CLASSES = {
    "qwen-image": _COMPONENTS,
    "qwen-image-edit": {**_COMPONENTS, **_PROCESSOR},
    "qwen-image-edit-plus": {**_COMPONENTS, **_PROCESSOR},
}


def template(system: str, user: str) -> str:
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

    @property
    def text_components(self) -> tuple[str, ...]:
        """What the encode stage loads (also the embedding cache revision's inputs)."""
        return ("text_encoder", "processor" if self.is_edit else "tokenizer")

    def user_text(self, prompt: str, num_images: int) -> str:
        if not self.is_edit:
            return prompt
        if self.picture_labels:
            return "".join(f"Picture {k + 1}: {IMAGE_SLOT}" for k in range(num_images)) + prompt
        return IMAGE_SLOT + prompt


VARIANTS = {
    "qwen-image": QwenVariant(
        name="qwen-image",
        system=T2I_SYSTEM,
        drop_tokens=34,
        picture_labels=False,
        truncate_embeddings=True,
        vl_area=None,
        vae_area=None,
    ),
    "qwen-image-edit": QwenVariant(
        name="qwen-image-edit",
        system=EDIT_SYSTEM,
        drop_tokens=64,
        picture_labels=False,
        truncate_embeddings=False,
        vl_area=1024 * 1024,
        vae_area=1024 * 1024,
    ),
    "qwen-image-edit-plus": QwenVariant(
        name="qwen-image-edit-plus",
        system=EDIT_SYSTEM,
        drop_tokens=64,
        picture_labels=True,
        truncate_embeddings=False,
        vl_area=384 * 384,
        vae_area=1024 * 1024,
    ),
}

_COMMON_DEFAULTS = dict(steps=50, guidance_scale=4.0, max_sequence_length=512, max_sequence_length_limit=1024)
DEFAULTS = {
    # One step makes the terminal stretch of the schedule divide by zero (NaN image): at least 2.
    "qwen-image": FamilyDefaults(size=1024, min_steps=2, **_COMMON_DEFAULTS),
    "qwen-image-edit": FamilyDefaults(size=None, min_steps=2, min_images=1, max_images=1, **_COMMON_DEFAULTS),
    "qwen-image-edit-plus": FamilyDefaults(size=None, min_steps=2, min_images=1, max_images=4, **_COMMON_DEFAULTS),
}


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
    assert variant.vl_area is not None and variant.vae_area is not None, "only the edit variants take images"
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


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent (rows, cols) of the noisy image: 2 * (pixels // 16)."""
    return 2 * (height // PATCH_MULTIPLE), 2 * (width // PATCH_MULTIPLE)


def max_condition_tokens(family: str) -> int:
    """A safe bound on one edit image's tokens: it is resized to about `vae_area` pixels (sides rounded to 32),
    so twice its tokens."""
    vae_area = VARIANTS[family].vae_area
    return 0 if vae_area is None else 2 * vae_area // PATCH_MULTIPLE**2


def check_edit_sizes(family: str, sizes: list[tuple[int, int]]) -> None:
    """Refuse input images whose aspect ratio makes the edit geometry round a side to nothing (the resize for
    the vision encoder or the VAE, or the default output size, would be 0 pixels wide)."""
    geometry = edit_geometry(VARIANTS[family], sizes)
    for index, (width, height) in enumerate(sizes):
        resized = (*geometry.vl_sizes[index], *geometry.vae_sizes[index])
        if min(resized) < MIN_RESIZED_SIDE:
            raise InvalidArgument(f"images[{index}]", _too_flat(width, height, family))
    if min(geometry.default_size) < 16:
        width, height = sizes[-1]
        raise InvalidArgument(f"images[{len(sizes) - 1}]", _too_flat(width, height, family))


def _too_flat(width: int, height: int, family: str) -> str:
    return f"a {width}x{height} image is too narrow or too flat for {family}"
