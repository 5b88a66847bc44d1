"""Request options: one validated, fully-defaulted description of a generate or edit request.

Every default equals the diffusers pipeline's default for the family (`FamilyDefaults`); validation errors
name the request field, so the CLI prints one line and the gateway answers `INVALID_ARGUMENT` for that field.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

from imagegen.common.errors import InvalidArgument

MAX_SEED = 2**63 - 1
MAX_CFG_OPTION = 1e6  # cfg_normalization / cfg_truncation: any finite, non-negative value diffusers accepts
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
    output_channels: int = 3  # RGB; Qwen-Image-2.1 decodes RGBA (4), which JPEG cannot hold


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
class ModelDefaults:
    """Request defaults a deployment sets for its model (`<model folder>/imagegen.json` or the `--default-*`
    flags, `imagegen.common.model_defaults`): each set field replaces the family's default. A request's own
    value, and an adapter's NAME.json, still win."""

    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None  # replaces the family's size (for edits also the size taken from the input image)
    height: int | None = None
    negative_prompt: str | None = None  # used, as the family's is, only when guidance runs CFG


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


def check_size(width: int, height: int, limits: Limits, prefix: str = "", multiple: int = 16) -> None:
    """Width and height: positive multiples of `multiple` (the family's `size_multiple`) up to `max_side`."""
    for name, value in (("width", width), ("height", height)):
        check_int(f"{prefix}{name}", value, multiple, limits.max_side, multiple_of=multiple)


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
    model: ModelDefaults = ModelDefaults(),
) -> ResolvedOptions:
    """Fill the unset options and validate: the one place a request's defaults are chosen (the gateway, the
    CLI and the embedded pipeline all resolve here). A request's own value wins, then the deployment's
    `model` defaults (`imagegen.common.model_defaults`), then the family's; `default_size` (width, height) is
    the family's default for edits, taken from the input image."""
    if options.prompt is None:
        raise InvalidArgument("prompt", "is required")
    check_text("prompt", options.prompt, limits)
    check_text("negative_prompt", options.negative_prompt, limits)  # also one that no CFG will use
    if num_input_images < defaults.min_images or num_input_images > defaults.max_images:
        if defaults.max_images == 0:
            raise InvalidArgument("images", f"{family} generates from text only; got {num_input_images} input images")
        raise InvalidArgument(
            "images", f"{family} takes {defaults.min_images} to {defaults.max_images} images, got {num_input_images}"
        )
    for name in ("cfg_normalization", "cfg_truncation"):
        if getattr(options, name) is not None and not defaults.supports_cfg_options:
            raise InvalidArgument(name, f"applies to z-image only, not {family}")

    fallback_w, fallback_h = default_size or (defaults.size, defaults.size)
    guidance = _first(options.guidance_scale, model.guidance_scale, defaults.guidance_scale)
    negative = _first(options.negative_prompt, model.negative_prompt, defaults.default_negative_prompt)
    if isinstance(guidance, int | float) and not isinstance(guidance, bool) and guidance <= defaults.cfg_above:
        negative = None  # the pipelines ignore the negative prompt without guidance
    resolved = ResolvedOptions(
        family=family,
        prompt=options.prompt,
        negative_prompt=negative,
        width=_first(options.width, model.width, fallback_w),
        height=_first(options.height, model.height, fallback_h),
        steps=_first(options.steps, model.steps, defaults.steps),
        guidance_scale=guidance,
        cfg_normalization=_first(options.cfg_normalization, defaults.cfg_normalization),
        cfg_truncation=_first(options.cfg_truncation, defaults.cfg_truncation),
        max_sequence_length=_first(options.max_sequence_length, defaults.max_sequence_length),
        seed=secrets.randbelow(MAX_SEED) if options.seed is None else options.seed,
        num_images=options.num_images,
        num_input_images=num_input_images,
    )
    check_bounds(resolved, defaults, limits)
    return dataclasses.replace(
        resolved,
        guidance_scale=float(resolved.guidance_scale),
        cfg_normalization=float(resolved.cfg_normalization),
        cfg_truncation=float(resolved.cfg_truncation),
    )


def _first(*values):
    return next((v for v in values if v is not None), None)  # None: check_bounds names the field


def check_bounds(options: ResolvedOptions, defaults: FamilyDefaults, limits: Limits, prefix: str = "") -> None:
    """Every bound of a resolved request, written once: `resolve_options` applies it to what it filled in, the
    stages (`imagegen.common.validation.check_resolved`) to what an internal caller sends. Errors name
    `prefix + field`."""
    check_text(f"{prefix}prompt", options.prompt, limits)
    check_text(f"{prefix}negative_prompt", options.negative_prompt, limits)
    check_int(f"{prefix}num_input_images", options.num_input_images, defaults.min_images, defaults.max_images)
    check_size(options.width, options.height, limits, prefix, defaults.size_multiple)
    check_int(f"{prefix}steps", options.steps, defaults.min_steps, limits.max_steps)
    check_number(f"{prefix}guidance_scale", options.guidance_scale, 0.0, limits.max_guidance_scale)
    for name, default in (
        ("cfg_normalization", defaults.cfg_normalization),
        ("cfg_truncation", defaults.cfg_truncation),
    ):
        value = getattr(options, name)
        check_number(f"{prefix}{name}", value, 0.0, MAX_CFG_OPTION)
        if not defaults.supports_cfg_options and value != default:
            raise InvalidArgument(f"{prefix}{name}", f"applies to z-image only, not {options.family}")
    check_int(f"{prefix}max_sequence_length", options.max_sequence_length, 1, defaults.max_sequence_length_limit)
    check_int(f"{prefix}num_images", options.num_images, 1, limits.max_images_per_request)
    check_pixels(f"{prefix}num_images", options.num_images, options.width, options.height, limits)
    check_int(f"{prefix}seed", options.seed, 0, MAX_SEED)
    if options.negative_prompt is not None and options.guidance_scale <= defaults.cfg_above:
        raise InvalidArgument(
            f"{prefix}negative_prompt",
            f"set, but guidance_scale {options.guidance_scale} <= {defaults.cfg_above} runs no CFG (leave it unset)",
        )
