"""Request options: one validated, fully-defaulted description of a generate or edit request.

Every default equals the diffusers pipeline's default for the family (`FamilyDefaults`); validation errors
name the request field, so the CLI prints one line and the gateway answers `INVALID_ARGUMENT` for that field.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from imagegen.common.errors import InvalidArgument

MAX_SEED = 2**63 - 1
# (width, height) of the sizes the OpenAI-compatible HTTP API advertises (its `size` parameter, besides `auto`:
# the model's default); `--warmup-sizes default` warms them up too.
ADVERTISED_SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))


@dataclass(frozen=True)
class FamilyDefaults:
    steps: int = 50
    guidance_scale: float = 4.0
    size: int | None = 1024  # None: taken from the input image (edit pipelines)
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 1024
    min_steps: int = 1
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    supports_cfg_options: bool = False  # cfg_normalization / cfg_truncation exist only for Z-Image
    # CFG runs when a negative prompt is present (after this default) and guidance_scale > cfg_above.
    default_negative_prompt: str | None = None
    cfg_above: float = 1.0
    min_images: int = 0
    max_images: int = 0
    size_multiple: int = 16  # width and height must be multiples of this (Qwen-Image-2.1: 32)


@dataclass(frozen=True)
class Limits:
    """Serving limits; the CLI uses the defaults, every service takes them from its --max-* flags (the stages
    check their internal requests against the same numbers as the gateway)."""

    max_side: int = 4096
    max_steps: int = 200
    max_images_per_request: int = 8
    max_prompt_chars: int = 8192
    max_guidance_scale: float = 100.0
    max_request_pixels: int = 64 << 20  # num_images x width x height of one request's output
    max_response_bytes: int = 512 << 20  # the encoded images of one response, estimated up front
    max_input_bytes: int = 32 << 20  # one input image file
    max_input_pixels: int = 64 << 20  # one decoded input image


@dataclass(frozen=True)
class RequestOptions:
    """What a caller may set; `None` means the family's default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    cfg_normalization: float | None = None
    cfg_truncation: float | None = None
    max_sequence_length: int | None = None
    seed: int | None = None
    num_images: int = 1


@dataclass(frozen=True)
class ResolvedOptions:
    """Every field concrete; `negative_prompt` is None exactly when no negative branch runs."""

    family: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    cfg_normalization: float
    cfg_truncation: float
    max_sequence_length: int
    seed: int
    num_images: int
    num_input_images: int = 0

    @property
    def uses_cfg(self) -> bool:
        return self.negative_prompt is not None


def check_number(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be between {low} and {high}, got {value}")


def check_int(name: str, value: int, low: int, high: int, multiple_of: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be between {low} and {high}, got {value}")
    if value % multiple_of:
        raise InvalidArgument(name, f"must be a multiple of {multiple_of}, got {value}")


def check_text(name: str, value: str | None, limits: Limits) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise InvalidArgument(name, f"is {len(value)} characters long; the limit is {limits.max_prompt_chars}")
    if "\x00" in value:
        raise InvalidArgument(name, "must not contain NUL characters")


def check_pixels(field: str, num_images: int, width: int, height: int, limits: Limits) -> None:
    pixels = num_images * width * height
    if pixels > limits.max_request_pixels:
        raise InvalidArgument(
            field,
            f"{num_images} images of {width}x{height} are {pixels} pixels; the limit is {limits.max_request_pixels}",
        )


def resolve_options(
    family: str,
    defaults: FamilyDefaults,
    options: RequestOptions,
    num_input_images: int = 0,
    limits: Limits = Limits(),
    default_size: tuple[int, int] | None = None,
) -> ResolvedOptions:
    """Fill family defaults and validate; `default_size` (width, height) comes from the input image for edits."""
    if options.prompt is None:
        raise InvalidArgument("prompt", "is required")
    check_text("prompt", options.prompt, limits)
    check_text("negative_prompt", options.negative_prompt, limits)
    if num_input_images < defaults.min_images or num_input_images > defaults.max_images:
        if defaults.max_images == 0:
            raise InvalidArgument("images", f"{family} generates from text only; got {num_input_images} input images")
        raise InvalidArgument(
            "images", f"{family} takes {defaults.min_images} to {defaults.max_images} images, got {num_input_images}"
        )

    fallback_w, fallback_h = default_size or (defaults.size, defaults.size)
    width = options.width if options.width is not None else fallback_w
    height = options.height if options.height is not None else fallback_h
    for name, value in (("width", width), ("height", height)):
        check_int(name, value, defaults.size_multiple, limits.max_side, multiple_of=defaults.size_multiple)

    steps = defaults.steps if options.steps is None else options.steps
    check_int("steps", steps, defaults.min_steps, limits.max_steps)
    guidance = defaults.guidance_scale if options.guidance_scale is None else options.guidance_scale
    check_number("guidance_scale", guidance, 0.0, limits.max_guidance_scale)

    cfg_norm, cfg_trunc = defaults.cfg_normalization, defaults.cfg_truncation
    for name, value in (("cfg_normalization", options.cfg_normalization), ("cfg_truncation", options.cfg_truncation)):
        if value is None:
            continue
        if not defaults.supports_cfg_options:
            raise InvalidArgument(name, f"applies to z-image only, not {family}")
        check_number(name, value, 0.0, 1e6)
    if options.cfg_normalization is not None:
        cfg_norm = float(options.cfg_normalization)
    if options.cfg_truncation is not None:
        cfg_trunc = float(options.cfg_truncation)

    max_len = defaults.max_sequence_length if options.max_sequence_length is None else options.max_sequence_length
    check_int("max_sequence_length", max_len, 1, defaults.max_sequence_length_limit)
    check_int("num_images", options.num_images, 1, limits.max_images_per_request)
    check_pixels("num_images", options.num_images, width, height, limits)

    seed = secrets.randbelow(MAX_SEED) if options.seed is None else options.seed
    check_int("seed", seed, 0, MAX_SEED)

    negative = defaults.default_negative_prompt if options.negative_prompt is None else options.negative_prompt
    if guidance <= defaults.cfg_above:
        negative = None  # the pipelines ignore the negative prompt without guidance

    return ResolvedOptions(
        family=family,
        prompt=options.prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        cfg_normalization=cfg_norm,
        cfg_truncation=cfg_trunc,
        max_sequence_length=max_len,
        seed=seed,
        num_images=options.num_images,
        num_input_images=num_input_images,
    )
