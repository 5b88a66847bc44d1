"""Per-model request defaults a deployment sets: `<model folder>/imagegen.json`, overridden by the denoiser's
`--default-steps/--default-guidance-scale/--default-width/--default-height/--default-negative-prompt` flags
(the Helm chart's `models[].defaults`). The denoiser announces them in its `Describe`; the gateway applies them
where every request's unset options are resolved (`imagegen.common.options.resolve_options`), and `ListModels`
and `/v1/models` show them.

    {"steps": 8, "guidance_scale": 0.0}

is what a Z-Image-Turbo folder needs (the diffusers pipeline's own defaults are 50 steps at guidance 5). The
published Turbo repositories carry no such file: add it beside `model_index.json`, or set the flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from imagegen.common.errors import ImagegenError, InvalidArgument
from imagegen.common.options import (
    FamilyDefaults,
    Limits,
    ModelDefaults,
    RequestOptions,
    check_text,
    resolve_options,
)

DEFAULTS_FILE = "imagegen.json"
KEYS: dict[str, type] = {
    "steps": int,
    "guidance_scale": float,
    "width": int,
    "height": int,
    "negative_prompt": str,
}


class ModelDefaultsError(ImagegenError):
    """A deployment's defaults are malformed or out of bounds (a start-up error, naming the key)."""


def read_model_defaults(folder: str | Path) -> ModelDefaults:
    """`folder/imagegen.json` (absent: no defaults)."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDefaultsError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelDefaultsError(f'{path}: must hold a JSON object such as {{"steps": 8}}')
    values = {}
    for key, value in data.items():
        kind = KEYS.get(key)
        if kind is None:
            raise ModelDefaultsError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        values[key] = _typed(value, kind, f"{path}: {key}")
    return ModelDefaults(**values)


def _typed(value, kind: type, where: str):
    if kind is str:
        if not isinstance(value, str):
            raise ModelDefaultsError(f"{where} must be a string, got {value!r}")
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (kind is int and value != int(value)):
        raise ModelDefaultsError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def write_model_defaults(folder: str | Path, defaults: ModelDefaults) -> Path:
    path = Path(folder) / DEFAULTS_FILE
    values = {k: v for k, v in dataclasses.asdict(defaults).items() if v is not None}
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path


def overlay(base: ModelDefaults, over: ModelDefaults) -> ModelDefaults:
    """`base` with every field `over` sets replaced (the flags over the file)."""
    changes = {k: v for k, v in dataclasses.asdict(over).items() if v is not None}
    return dataclasses.replace(base, **changes)


def check_model_defaults(
    defaults: ModelDefaults, family: str, family_defaults: FamilyDefaults, limits: Limits, source: str
) -> None:
    """Refuse, at start-up, defaults that no request could run with: the bounds every request is resolved
    against (`resolve_options`), applied to a request that sets only what the deployment leaves to the family
    (at its smallest valid values, so only the deployment's own values are judged). The error names the key."""
    if (defaults.width is None) != (defaults.height is None):
        raise ModelDefaultsError(f"{source}: width and height are set together")
    smallest = family_defaults.size_multiple  # the smallest valid side (16; Qwen-Image-2.1: 32)
    side = None if defaults.width is not None else smallest
    probe = RequestOptions(
        "probe",
        width=side,
        height=side,
        steps=family_defaults.min_steps if defaults.steps is None else None,
        guidance_scale=0.0 if defaults.guidance_scale is None else None,
    )
    try:
        check_text("negative_prompt", defaults.negative_prompt, limits)  # also one this model's guidance drops
        resolve_options(
            family, family_defaults, probe, family_defaults.min_images, limits, (smallest, smallest), defaults
        )
    except InvalidArgument as exc:
        raise ModelDefaultsError(f"{source}: {exc.field} {exc.message}") from exc
