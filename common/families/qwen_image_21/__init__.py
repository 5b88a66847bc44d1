"""Qwen-Image-2.1 and its Turbo checkpoint: the facts, torch-free.

What the gateway, the client and the checks need without loading a model: defaults and limits, the prompt
template, the geometry and the checkpoint classes. The stages are in `pipeline` (encode, prepare, the denoise
loop), the VAE stage in `vae`, the DiT forward in `dit` (reference; the fast path is not written yet). Read next
to diffusers 0.42.1 `pipelines/qwenimage21/pipeline_qwenimage21.py` and
`models/transformers/transformer_qwenimage21.py`:

* defaults: 40 steps, `true_cfg_scale` 1.0 (the model is sampled without guidance; CFG runs only with a
  scale > 1 and a negative prompt), 1024x1024; sizes are multiples of 32 (the pipeline floors to
  `vae_scale_factor * 2`, we refuse other sizes instead of changing them silently);
* the Turbo checkpoint is the same pipeline with `sample_sigmas` in model_index.json: that grid (its length
  is the step count) replaces `linspace(1, 1/N, N)` and `num_inference_steps` is ignored;
* one latent token is a 16x16 pixel tile (16x VAE, no patching), 64 channels, flattened raster order;
* decode: RGBA images (4 channels), which PNG, WEBP and NPY keep and JPEG cannot hold.
"""

from __future__ import annotations

from imagegen.common.options import FamilyDefaults

NAME = "qwen-image-2.1"
LATENT_CHANNELS = 64
VAE_SCALE = 16  # pixels per latent token side
SIZE_MULTIPLE = 2 * VAE_SCALE  # the pipeline floors width and height to this
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
IMAGE_PAD = "<|image_pad|>"
# Bump when anything that changes prompt embeddings for the same inputs changes (it is part of cache keys).
TEMPLATE_VERSION = "qwen21-1"
TEXT_COMPONENTS = ("text_encoder", "processor")  # what the encode stage loads (also the cache revision's inputs)
# The pipeline mixes in Qwen-Image's loader: its `lora_state_dict` converts community adapter formats.
LORA_LOADER = "QwenImageLoraLoaderMixin"

# model_index.json's pipeline class -> family (the Turbo checkpoint is the same class with `sample_sigmas`),
# and the classes each component may have (others are refused).
PIPELINE_CLASSES = {"QwenImage21Pipeline": NAME}
COMPONENT_CLASSES = {
    NAME: {
        "transformer": {"QwenImage21Transformer2DModel"},
        "vae": {"AutoencoderKLQwenImage21"},
        "text_encoder": {"Qwen3VLForConditionalGeneration"},
        "processor": {"Qwen3VLProcessor"},
        "scheduler": {"FlowMatchEulerDiscreteScheduler"},
    }
}

DEFAULTS = {
    NAME: FamilyDefaults(
        steps=40,
        guidance_scale=1.0,
        size=1024,
        # 2.1 never truncates its embeddings; the option is accepted (and ignored) as for the edit pipelines.
        max_sequence_length=512,
        max_sequence_length_limit=1024,
        # linspace(1, 1/N, N) with N = 1 is [1.0]; the terminal stretch then divides by zero, as for Qwen-Image.
        min_steps=2,
        size_multiple=SIZE_MULTIPLE,
        output_channels=4,  # the VAE decodes RGBA
    )
}


def t2i_prompt(prompt: str) -> str:
    """The pipeline's `prompt_template_t2i` around `prompt` (an empty prompt becomes " ": Qwen has no BOS)."""
    user = prompt or " "
    return f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent (rows, cols) of a `width` x `height` image: one token per 16x16 pixels."""
    return height // VAE_SCALE, width // VAE_SCALE


def target_shape(width: int, height: int) -> tuple[int, int, int]:
    """The target image's `img_shapes` entry (frames, rows, cols)."""
    return (1, *latent_grid(width, height))


def sample_sigmas(model_index: dict) -> list[float] | None:
    """The Turbo grid stored in model_index.json (None for the regular checkpoint)."""
    sigmas = model_index.get("sample_sigmas")
    return None if sigmas is None else [float(s) for s in sigmas]
