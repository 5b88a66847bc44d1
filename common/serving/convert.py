"""Proto messages <-> runtime objects: request options, resolved options, output formats, token grids."""

from __future__ import annotations

from collections.abc import Iterable

from imagegen.common.errors import InvalidArgument
from imagegen.common.options import ModelDefaults, RequestOptions, ResolvedOptions
from imagegen.v1 import common_pb2, denoiser_pb2

# Optional public request fields that map one to one onto RequestOptions (unset: the family's default).
OPTION_FIELDS = (
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "cfg_normalization",
    "cfg_truncation",
    "max_sequence_length",
    "seed",
)
_PREFIX = "OUTPUT_FORMAT_"


def request_options(request) -> RequestOptions:
    """A GenerateImageRequest/EditImageRequest -> RequestOptions (validation happens in `resolve_for`)."""
    values = {name: getattr(request, name) if request.HasField(name) else None for name in OPTION_FIELDS}
    num_images = request.num_images if request.HasField("num_images") else 1
    return RequestOptions(prompt=request.prompt, num_images=num_images, **values)


def format_name(value: int, field: str = "output_format") -> str:
    """Enum value -> "PNG"/"JPEG"/"WEBP"/"NPY" (unspecified: PNG); unknown numbers are the caller's error."""
    if value == common_pb2.OUTPUT_FORMAT_UNSPECIFIED:
        return "PNG"
    try:
        return common_pb2.OutputFormat.Name(value).removeprefix(_PREFIX)
    except ValueError:
        known = ", ".join(n for n in common_pb2.OutputFormat.keys() if n != "OUTPUT_FORMAT_UNSPECIFIED")
        raise InvalidArgument(field, f"unknown output format {value} (use one of {known})") from None


def resolved_to_proto(resolved: ResolvedOptions) -> denoiser_pb2.ResolvedOptions:
    message = denoiser_pb2.ResolvedOptions(
        family=resolved.family,
        prompt=resolved.prompt,
        width=resolved.width,
        height=resolved.height,
        steps=resolved.steps,
        guidance_scale=resolved.guidance_scale,
        cfg_normalization=resolved.cfg_normalization,
        cfg_truncation=resolved.cfg_truncation,
        max_sequence_length=resolved.max_sequence_length,
        seed=resolved.seed,
        num_images=resolved.num_images,
        num_input_images=resolved.num_input_images,
    )
    if resolved.negative_prompt is not None:
        message.negative_prompt = resolved.negative_prompt
    return message


def resolved_from_proto(message: denoiser_pb2.ResolvedOptions) -> ResolvedOptions:
    return ResolvedOptions(
        family=message.family,
        prompt=message.prompt,
        negative_prompt=message.negative_prompt if message.HasField("negative_prompt") else None,
        width=message.width,
        height=message.height,
        steps=message.steps,
        guidance_scale=message.guidance_scale,
        cfg_normalization=message.cfg_normalization,
        cfg_truncation=message.cfg_truncation,
        max_sequence_length=message.max_sequence_length,
        seed=message.seed,
        num_images=message.num_images,
        num_input_images=message.num_input_images,
    )


def grids_to_proto(shapes: Iterable[tuple[int, int, int]]) -> list[denoiser_pb2.TokenGrid]:
    return [denoiser_pb2.TokenGrid(frames=f, rows=r, cols=c) for f, r, c in shapes]


def grids_from_proto(grids: Iterable[denoiser_pb2.TokenGrid]) -> list[tuple[int, int, int]]:
    return [(g.frames, g.rows, g.cols) for g in grids]


def lora_weights(request) -> list[tuple[str, float]]:
    """A public or denoise request's `loras` as (name, scale) pairs, in request order."""
    return [(weight.name, weight.scale) for weight in request.loras]


def lora_weights_to_proto(weights: Iterable[tuple[str, float]]) -> list[common_pb2.LoraWeight]:
    return [common_pb2.LoraWeight(name=name, scale=scale) for name, scale in weights]


def lora_info(name: str, defaults) -> common_pb2.LoraInfo:
    """A served adapter and its NAME.json defaults (`imagegen.common.lora.LoraDefaults`)."""
    info = common_pb2.LoraInfo(name=name)
    if defaults.steps is not None:
        info.steps = defaults.steps
    if defaults.guidance_scale is not None:
        info.guidance_scale = defaults.guidance_scale
    if defaults.scheduler_shift is not None:
        info.scheduler_shift = defaults.scheduler_shift
    return info


def lora_defaults(info: common_pb2.LoraInfo):
    from imagegen.common.lora import LoraDefaults

    return LoraDefaults(
        steps=info.steps if info.HasField("steps") else None,
        guidance_scale=info.guidance_scale if info.HasField("guidance_scale") else None,
    )


_DEFAULT_FIELDS = ("steps", "guidance_scale", "width", "height", "negative_prompt")


def model_defaults_to_proto(defaults: ModelDefaults) -> common_pb2.ModelDefaults:
    """The deployment's defaults (`imagegen.common.model_defaults`): only the fields it sets."""
    values = {k: getattr(defaults, k) for k in _DEFAULT_FIELDS}
    return common_pb2.ModelDefaults(**{k: v for k, v in values.items() if v is not None})


def model_defaults_from_proto(message: common_pb2.ModelDefaults) -> ModelDefaults:
    return ModelDefaults(**{k: getattr(message, k) for k in _DEFAULT_FIELDS if message.HasField(k)})
