"""The model families: each is data plus one module or package (`qwen_image`, `z_image`, `qwen_image_21`).

`Family` is the table the stages and services look up by name; nothing outside the family modules knows a
family-specific fact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imagegen.common.errors import ModelLoadError
from imagegen.common.families import qwen_image, z_image
from imagegen.common.families.qwen_image_21 import facts as qwen21_facts
from imagegen.common.families.qwen_image_21 import pipeline as qwen21
from imagegen.common.options import FamilyDefaults


@dataclass(frozen=True)
class Family:
    name: str
    defaults: FamilyDefaults
    template_version: str
    text_components: tuple[str, ...]  # what the encode stage loads (also the cache revision's inputs)
    text_encoder: type
    vae: type
    denoiser: type
    default_size: Callable[[list[tuple[int, int]]], tuple[int, int] | None]
    warmup_jobs: Callable[[int, int, dict], list]  # (width, height, transformer config) -> DenoiseJobs

    @property
    def takes_images(self) -> bool:
        return self.defaults.max_images > 0


def _qwen(name: str, text_components: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        defaults=qwen_image.DEFAULTS[name],
        template_version=qwen_image.TEMPLATE_VERSION,
        text_components=text_components,
        text_encoder=qwen_image.QwenTextEncoder,
        vae=qwen_image.QwenVae,
        denoiser=qwen_image.QwenDenoiser,
        default_size=lambda sizes, _name=name: qwen_image.default_size(_name, sizes),
        warmup_jobs=lambda w, h, config, _name=name: qwen_image.warmup_jobs(_name, w, h, config),
    )


FAMILIES: dict[str, Family] = {
    "qwen-image": _qwen("qwen-image", ("text_encoder", "tokenizer")),
    "qwen-image-edit": _qwen("qwen-image-edit", ("text_encoder", "processor")),
    "qwen-image-edit-plus": _qwen("qwen-image-edit-plus", ("text_encoder", "processor")),
    "z-image": Family(
        name="z-image",
        defaults=z_image.DEFAULTS["z-image"],
        template_version=z_image.TEMPLATE_VERSION,
        text_components=("text_encoder", "tokenizer"),
        text_encoder=z_image.ZImageTextEncoder,
        vae=z_image.ZImageVae,
        denoiser=z_image.ZImageDenoiser,
        default_size=lambda sizes: None,
        warmup_jobs=z_image.warmup_jobs,
    ),
    qwen21_facts.NAME: Family(
        name=qwen21_facts.NAME,
        defaults=qwen21_facts.DEFAULTS,
        template_version=qwen21_facts.TEMPLATE_VERSION,
        text_components=("text_encoder", "processor"),
        text_encoder=qwen21.Qwen21TextEncoder,
        vae=qwen21.Qwen21Vae,
        denoiser=qwen21.Qwen21Denoiser,
        default_size=lambda sizes: None,
        warmup_jobs=qwen21.warmup_jobs,
    ),
}


def get_family(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise ModelLoadError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return family
