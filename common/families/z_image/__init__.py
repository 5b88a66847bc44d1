"""Z-Image and Z-Image-Turbo: the facts, torch-free.

What the gateway, the client and the checks need without loading a model: defaults and limits, the token
geometry and the checkpoint classes. The stages are in `pipeline` (encode, VAE, prepare, the denoise loop),
the DiT forwards in `dit` (reference) and `dit_fast` (fast path). Read next to diffusers 0.42.1
`pipelines/z_image/pipeline_z_image.py` and `models/transformers/transformer_z_image.py`:

* encode: the tokenizer's own chat template (`enable_thinking=True`), padded to `max_sequence_length`, the
  second-to-last hidden layer of the Qwen3 encoder, padding tokens removed;
* prepare: noise drawn `[K, 16, h, w]` in float32; sigmas `torch.linspace(1, 1/N, N)` with the scheduler's
  static shift (3 for Turbo);
* denoise: our DiT forward over the diffusers layers with our attention processor. Image tokens (2x2 patches,
  channel fastest) and caption tokens are each padded to a multiple of 32 with learned pad tokens, refined
  separately, then joined `[image, caption]`. RoPE ids: caption k -> (1 + k, 0, 0), image (y, x) ->
  (Lp + 1, y, x) with Lp the branch's own padded caption length, pads (0, 0, 0). The branches run as
  separate forwards; CFG `pos + g (pos - neg)` with the optional norm clip and time truncation, in float32;
  the prediction is negated before the Euler step and the latents stay float32;
* decode: `latents / scaling_factor + shift_factor`, VAE decode.
"""

from __future__ import annotations

from imagegen.common.options import FamilyDefaults

NAME = "z-image"
LATENT_CHANNELS = 16
PATCH_MULTIPLE = 16  # pixels per token side: VAE scale 8 x patch 2
PATCH_KEY = "2-1"  # all_x_embedder / all_final_layer key: patch 2, frame patch 1
SEQ_MULTI_OF = 32  # diffusers' `transformer_z_image.SEQ_MULTI_OF` (checked equal in `dit`)
TEMPLATE_VERSION = "z-image-1"
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
LORA_LOADER = "ZImageLoraLoaderMixin"  # diffusers' mixin whose `lora_state_dict` reads community formats

PIPELINE_CLASSES = {"ZImagePipeline": NAME}
COMPONENT_CLASSES = {
    NAME: {
        "transformer": {"ZImageTransformer2DModel"},
        "vae": {"AutoencoderKL"},
        "text_encoder": {"Qwen3Model", "Qwen3ForCausalLM"},
        "tokenizer": {"Qwen2Tokenizer", "Qwen2TokenizerFast"},
        "scheduler": {"FlowMatchEulerDiscreteScheduler"},
    }
}

DEFAULTS = {
    NAME: FamilyDefaults(
        steps=50,
        guidance_scale=5.0,
        size=1024,
        max_sequence_length=512,
        # The caption's RoPE ids (1 + k, padded to 32) must stay inside the 1024-long first axis.
        max_sequence_length_limit=960,
        supports_cfg_options=True,
        default_negative_prompt="",
        cfg_above=0.0,
    )
}


def padded_length(length: int) -> int:
    return length + (-length) % SEQ_MULTI_OF


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent (rows, cols) of an image: 2 * (pixels // 16)."""
    return 2 * (height // PATCH_MULTIPLE), 2 * (width // PATCH_MULTIPLE)


def max_text_tokens(first_axis_len: int) -> int:
    """Most caption tokens whose RoPE ids fit: ids 1..Lp (Lp the length padded to 32) and the image frame id
    Lp + 1, all on the first axis of `first_axis_len` rows."""
    return (first_axis_len - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF
