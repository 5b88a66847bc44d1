"""What every stage checks before it works on a request: the gateway on the public API, and the encoder,
denoiser and VAE on their internal APIs, so a stage reached directly refuses what the gateway would.

* options: `check_resolved` applies `resolve_options`' bounds (`check_bounds`, written once) to already-resolved
  options (family, size, steps, images, pixels per request, guidance, CFG options, seed);
* tensors against the loaded model (`ModelInputs`, asked of the family's denoise stage): names, ranks, dtypes,
  finiteness, the embedding width, token counts against the RoPE tables, condition latents against their grids;
* inputs and outputs: image count and bytes (`check_image_blobs`; decoding limits are in `imagegen.common.images`), and
  the response size, estimated before any work (`check_response_size`);
* LoRA adapters: names, scales and count (`imagegen.common.lora.registry.check_lora_weights`), and each file
  against the loaded transformer (`check_lora_fit`).

Failures raise `InvalidArgument(field)` (INVALID_ARGUMENT with a BadRequest naming the field), or
`ResponseTooLarge` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from imagegen.common.errors import ImagegenError, InvalidArgument
from imagegen.common.options import (
    FamilyDefaults,
    Limits,
    ResolvedOptions,
    check_bounds,
    check_int,
    check_pixels,
)

# Largest encoded size per pixel and channel, by output format: NPY float32; PNG of incompressible data (the
# channels plus the per-row filter byte, rounded up: one more byte per pixel); JPEG and WEBP stay below the raw
# bytes at the encoders' default quality.
_BYTES_PER_CHANNEL = {"NPY": 4, "PNG": 1, "JPEG": 1, "WEBP": 1}
_EXTRA_BYTES_PER_PIXEL = {"NPY": 0, "PNG": 1, "JPEG": 0, "WEBP": 0}
ALPHA_FORMATS = ("PNG", "WEBP", "NPY")  # the output formats that keep a fourth (alpha) channel
_PER_IMAGE_OVERHEAD = 4096  # headers and chunking
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ResponseTooLarge(ImagegenError):
    """The images a request asks for would exceed the response-size limit."""


class ModelInputs(NamedTuple):
    """What a loaded denoise stage accepts for one job (`imagegen.common.families.inputs.denoiser_inputs`)."""

    embedding_dim: int  # the text encoder's hidden width the transformer projects from
    max_text_tokens: int  # most prompt tokens whose RoPE rows exist next to this job's image grids
    condition_channels: int | None  # channels of packed edit-image latents; None: the model takes no images
    max_condition_tokens: int = 0  # most tokens of one edit image's grid (the VAE resizes to a fixed area)
    max_grid_side: int = 0  # most token rows or columns of a grid (the RoPE tables' reach)


# -------------------------------------------------------------------------------------------------- options
def check_resolved(
    options: ResolvedOptions, family: str, defaults: FamilyDefaults, limits: Limits, prefix: str = "options."
) -> None:
    """Resolved options from an internal caller: the family, then the bounds `resolve_options` applies
    (`imagegen.common.options.check_bounds`, one table for both)."""
    if options.family != family:
        raise InvalidArgument(f"{prefix}family", f"this stage hosts {family}, not {options.family!r}")
    check_bounds(options, defaults, limits, prefix)


def response_bytes(num_images: int, width: int, height: int, fmt: str, channels: int = 3) -> int:
    """An upper bound of the encoded images' size (`channels` per pixel: 3 RGB, 4 RGBA)."""
    per_pixel = channels * _BYTES_PER_CHANNEL[fmt] + _EXTRA_BYTES_PER_PIXEL[fmt]
    return num_images * (width * height * per_pixel + _PER_IMAGE_OVERHEAD)


def check_output_format(fmt: str, channels: int, family: str, field: str = "output_format") -> None:
    """Refuse a format that cannot hold the family's images (RGBA as JPEG), before any work."""
    if channels == 4 and fmt not in ALPHA_FORMATS:
        raise InvalidArgument(field, f"{fmt} has no alpha channel for {family}'s RGBA images: use PNG, WEBP or NPY")


def check_response_size(num_images: int, width: int, height: int, fmt: str, limits: Limits, channels: int = 3) -> None:
    size = response_bytes(num_images, width, height, fmt, channels)
    if size > limits.max_response_bytes:
        raise ResponseTooLarge(
            f"{num_images} {fmt} images of {width}x{height} may take {size} bytes; the response limit is "
            f"{limits.max_response_bytes} (ask for fewer images, or PNG/JPEG/WEBP instead of NPY)"
        )


def check_image_blobs(images: Sequence[bytes], defaults: FamilyDefaults, family: str, limits: Limits) -> None:
    """Edit images as sent: how many (for this family and at most the per-request limit) and their bytes."""
    most = min(defaults.max_images, limits.max_images_per_request)
    if not defaults.min_images <= len(images) <= most:
        if defaults.max_images == 0:
            raise InvalidArgument("images", f"{family} generates from text only; got {len(images)} input images")
        raise InvalidArgument("images", f"{family} takes {defaults.min_images} to {most} images, got {len(images)}")
    for index, data in enumerate(images):
        if len(data) > limits.max_input_bytes:
            raise InvalidArgument(f"images[{index}]", f"is {len(data)} bytes; the limit is {limits.max_input_bytes}")


# -------------------------------------------------------------------------------------------------- tensors
def check_tensor(tensor: torch.Tensor, field: str, shape: Sequence[int | None], dtypes=FLOAT_DTYPES) -> None:
    """Rank, dtype, size (None: any length >= 1) and finiteness of one received tensor."""
    if tensor.dim() != len(shape):
        raise InvalidArgument(field, f"expected {len(shape)} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InvalidArgument(field, f"dtype {str(tensor.dtype).removeprefix('torch.')} is not one of {names}")
    for axis, (size, want) in enumerate(zip(tensor.shape, shape, strict=True)):
        if (want is None and size < 1) or (want is not None and size != want):
            expected = tuple("L" if w is None else w for w in shape)
            raise InvalidArgument(field, f"expected shape {expected}, got {tuple(tensor.shape)} (axis {axis})")
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidArgument(field, "contains NaN or infinite values")


def check_embeddings(tensor: torch.Tensor, field: str, prompt_field: str, inputs: ModelInputs) -> None:
    """Prompt embeddings `[L, D]`: D the model's width, L within its RoPE tables (reported against the prompt,
    which is what a caller can shorten)."""
    check_tensor(tensor, field, (None, inputs.embedding_dim))
    if tensor.shape[0] > inputs.max_text_tokens:
        raise InvalidArgument(
            prompt_field,
            f"is {tensor.shape[0]} tokens long (with the input images' tokens); this model's position tables "
            f"allow at most {inputs.max_text_tokens} at this output size",
        )


def check_condition(
    latents: torch.Tensor | None,
    shapes: Sequence[tuple[int, int, int]],
    options: ResolvedOptions,
    inputs: ModelInputs,
    limits: Limits,
) -> None:
    """Edit-image latents `[1, S, C]` and their token grids: one grid per input image, single frames, no more
    tokens per image than the VAE's resize makes, S = the grids' tokens."""
    if options.num_input_images == 0:
        if latents is not None or shapes:
            raise InvalidArgument("condition", "given, but options.num_input_images is 0")
        return
    if inputs.condition_channels is None:
        raise InvalidArgument("condition", "this model takes no input images")
    if latents is None:
        raise InvalidArgument("condition", f"required for {options.num_input_images} input images")
    if len(shapes) != options.num_input_images:
        raise InvalidArgument(
            "condition.shapes", f"{len(shapes)} grids for options.num_input_images = {options.num_input_images}"
        )
    most = inputs.max_condition_tokens
    tokens = 0
    for index, (frames, rows, cols) in enumerate(shapes):
        field = f"condition.shapes[{index}]"
        if frames != 1:
            raise InvalidArgument(f"{field}.frames", f"must be 1, got {frames}")
        for name, value in (("rows", rows), ("cols", cols)):
            check_int(f"{field}.{name}", value, 1, inputs.max_grid_side)
        if rows * cols > most:
            raise InvalidArgument(field, f"{rows}x{cols} tokens; at most {most} per image")
        tokens += rows * cols
    check_tensor(latents, "condition.safetensors", (1, tokens, inputs.condition_channels))


def check_latents(
    latents: torch.Tensor, per_image: Sequence[int], width: int, height: int, limits: Limits, field: str = "latents"
) -> int:
    """Final latents `[K, *per_image]` for K images of `width` x `height`; returns K."""
    count = latents.shape[0] if latents.dim() else 0
    check_int(f"{field}.shape[0]", count, 1, limits.max_images_per_request)
    check_pixels(f"{field}.shape[0]", count, width, height, limits)
    check_tensor(latents, field, (count, *per_image))
    return count


# -------------------------------------------------------------------------------------------------- adapters
def check_lora_fit(stage, loras: Sequence[tuple[str, float]], names: Sequence[str], prefix: str = "loras") -> None:
    """Each (file, scale) of a job loads and fits the stage's transformer (read into its adapter cache now,
    so the run itself cannot fail on it); failures name `loras[i].name`, with the request's name `names[i]`."""
    from imagegen.common.lora import AdapterError

    stage = getattr(stage, "denoiser", stage)  # rank 0's stage behind a group handle
    for index, ((path, _), name) in enumerate(zip(loras, names, strict=True)):
        try:
            stage.adapters.get(path, name)
        except AdapterError as exc:
            message = f"adapter {name!r} does not fit this model: {exc}"
            raise InvalidArgument(f"{prefix}[{index}].name", message) from exc
