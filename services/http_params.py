"""The OpenAI-compatible request bodies, from one table: each HTTP parameter, its type and bounds, its doc, and
the ImageService request field it sets. The generation (JSON) and edit (multipart) bodies, the OpenAPI document
and the conversion to the gRPC request all read `PARAMS`, so a new option is one row here (plus the proto field).

Types are bounded to their proto fields' ranges, so that setting the message never fails: every out-of-range
value is the caller's 400, never our 500. The values themselves are validated where gRPC requests are
(`imagegen.common.validation`, in the gateway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from imagegen_client.v1 import common_pb2, image_service_pb2
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model

from imagegen.common.options import ADVERTISED_SIZES
from imagegen.common.serving.status import invalid_argument

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Float = Annotated[float, Field(allow_inf_nan=False)]
SIZE_PATTERN = r"^(auto|[0-9]{1,6}x[0-9]{1,6})$"


def _json_text(value: Any) -> Any:
    """A multipart form sends objects as text: decode it (JSON bodies pass objects through)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # pydantic then reports it as not an object
    return value


# Names are short: a caller's 20 MiB model or adapter name must not come back in an error (or a log line).
Name = Annotated[str, StringConstraints(max_length=128)]
Loras = Annotated[dict[Name, Float], BeforeValidator(_json_text), Field(max_length=64)]


@dataclass(frozen=True)
class Param:
    name: str  # the HTTP field
    annotation: Any
    description: str
    field: str | None = None  # the request field it sets as given; None: `to_request` handles it
    default: Any = None
    extension: bool = False  # ours, not in OpenAI's API


PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "What to draw, or how to change the input images.", "prompt", default=...),
    Param("model", Name | None, "Model id (GET /v1/models); unset: the gateway's default model.", "model"),
    Param("n", Int32 | None, "Number of images (default 1).", "num_images"),
    Param(
        "size",
        Annotated[str, Field(pattern=SIZE_PATTERN)] | None,
        f"WIDTHxHEIGHT, e.g. {', '.join(f'{w}x{h}' for w, h in ADVERTISED_SIZES)} (warmed up by default; any "
        "other multiple of 16 within the limits works too); auto or unset: the model's default.",
    ),
    Param(
        "response_format", Literal["b64_json", "url"] | None, "b64_json (the default and the only one: url gives 400)."
    ),
    Param("output_format", Literal["png", "jpeg", "webp"] | None, "Image encoding (default png)."),
    Param("stream", bool | None, "Send progress and the images as server-sent events.", default=False),
    Param(
        "partial_images",
        Annotated[int, Field(ge=0, le=3)] | None,
        "Accepted for compatibility: this server streams progress events, not partial images.",
    ),
    Param("user", Annotated[str, StringConstraints(max_length=256)] | None, "Accepted and ignored."),
    Param("negative_prompt", str | None, "What to steer away from (true CFG).", "negative_prompt", extension=True),
    Param("seed", Int64 | None, "Random seed; unset: random (the response tells which).", "seed", extension=True),
    Param("num_inference_steps", Int32 | None, "Denoising steps; unset: the model's default.", "steps", extension=True),
    Param("guidance_scale", Float | None, "CFG scale; unset: the model's default.", "guidance_scale", extension=True),
    Param("cfg_normalization", Float | None, "Z-Image only.", "cfg_normalization", extension=True),
    Param("cfg_truncation", Float | None, "Z-Image only.", "cfg_truncation", extension=True),
    Param("max_sequence_length", Int32 | None, "Most prompt tokens.", "max_sequence_length", extension=True),
    Param(
        "loras",
        Loras | None,
        'LoRA adapters by name with their scales, e.g. {"style": 0.8} (a JSON object in the edit form).',
        extension=True,
    ),
)

_FORMATS = {
    "png": common_pb2.OUTPUT_FORMAT_PNG,
    "jpeg": common_pb2.OUTPUT_FORMAT_JPEG,
    "webp": common_pb2.OUTPUT_FORMAT_WEBP,
}
# gRPC field names (as validation reports them) -> the HTTP parameter to name in a 400.
PARAM_OF_FIELD = {p.field: p.name for p in PARAMS if p.field} | {"width": "size", "height": "size", "images": "image"}


def _model(name: str) -> type[BaseModel]:
    fields = {
        p.name: (p.annotation, Field(p.default, description=p.description + (" (extension)" if p.extension else "")))
        for p in PARAMS
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


ImageGenerationRequest = _model("ImageGenerationRequest")
# The edit form's text fields (the images come as files: `image`, or `image[]` for several).
ImageEditFields = _model("ImageEditFields")


def edit_form_schema() -> dict[str, Any]:
    """The multipart body of /v1/images/edits for the OpenAPI document."""
    schema = ImageEditFields.model_json_schema(ref_template="#/components/schemas/{model}")
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    schema["properties"] = {
        "image": {"description": "One input image (PNG, JPEG, WEBP), or several as repeated parts.", **files},
        "image[]": {"description": "Input images, as the openai client sends a list.", **files},
        **schema["properties"],
    }
    schema.pop("additionalProperties", None)  # the image parts are not in the model
    return schema


def to_request(body: BaseModel, images: list[bytes] | None):
    """A validated body (and, for an edit, its images) -> GenerateImageRequest / EditImageRequest."""
    values = body.model_dump()
    if values["response_format"] == "url":
        raise invalid_argument("response_format", "url is not offered: this server returns images as b64_json")
    fields = {p.field: values[p.name] for p in PARAMS if p.field and values[p.name] is not None}
    size = values["size"]
    if size and size != "auto":
        width, height = size.split("x")
        fields["width"], fields["height"] = int(width), int(height)  # at most 6 digits each: within int32
    fields["output_format"] = _FORMATS[values["output_format"] or "png"]
    if values["loras"]:
        fields["loras"] = [common_pb2.LoraWeight(name=n, scale=s) for n, s in values["loras"].items()]
    if images is None:
        return image_service_pb2.GenerateImageRequest(**fields)
    return image_service_pb2.EditImageRequest(images=images, **fields)
