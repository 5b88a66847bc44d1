"""The model families: each a package (`qwen_image`, `z_image`, `qwen_image_21`) whose `__init__` holds its
torch-free facts, `pipeline` its stages (encode, prepare, the denoise loop), `vae` its VAE stage, `dit` /
`dit_fast` its DiT forwards.

`Family` is the table the stages and services look up by name; nothing outside the family packages knows a
family-specific fact. Importing this module (or a family's facts) imports neither torch nor diffusers: the
gateway and the client read the facts; the stage classes are imported on first use (`Family.text_encoder`,
`vae`, `denoiser`, `warmup_jobs`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagegen.common.errors import ModelLoadError
from imagegen.common.families import qwen_image, qwen_image_21, z_image
from imagegen.common.options import FamilyDefaults


@dataclass(frozen=True)
class Family:
    name: str
    package: str  # the family package, e.g. "qwen_image"
    defaults: FamilyDefaults
    template_version: str
    text_components: tuple[str, ...]  # what the encode stage loads (also the cache revision's inputs)
    lora_loader: str  # the diffusers mixin whose `lora_state_dict` converts community adapter formats
    default_size: Callable[[list[tuple[int, int]]], tuple[int, int] | None]
    check_image_sizes: Callable[[list[tuple[int, int]]], None]  # refuses edit images it cannot resize
    stages: tuple[str, str, str]  # "module.Class" of the text encoder, VAE and denoiser within `package`

    @property
    def takes_images(self) -> bool:
        return self.defaults.max_images > 0

    def module(self, name: str) -> Any:
        """A module of the family package, e.g. "pipeline" (imports torch and diffusers)."""
        return importlib.import_module(f"{__name__}.{self.package}.{name}")

    def _stage(self, index: int) -> type:
        module, cls = self.stages[index].rsplit(".", 1)
        return getattr(self.module(module), cls)

    @property
    def pipeline(self) -> Any:
        """The family's stages module: prepare, denoise, `input_limits`, `warmup_jobs`."""
        return self.module("pipeline")

    @property
    def text_encoder(self) -> type:
        return self._stage(0)

    @property
    def vae(self) -> type:
        return self._stage(1)

    @property
    def denoiser(self) -> type:
        return self._stage(2)

    def vae_from_module(self, module: Any) -> Any:
        """The VAE stage over an already-built VAE (benchmarks build full-size ones with random weights)."""
        if self.package == "qwen_image":
            return self.vae.from_module(module, self.name)  # the edit variants size their input images
        return self.vae.from_module(module)

    def warmup_jobs(self, width: int, height: int, transformer_config: dict) -> list:
        """The `DenoiseJob`s that warm up a size (`imagegen.common.warmup`)."""
        return self.pipeline.warmup_jobs(self.name, width, height, transformer_config)


def _qwen(name: str) -> Family:
    return Family(
        name=name,
        package="qwen_image",
        defaults=qwen_image.DEFAULTS[name],
        template_version=qwen_image.TEMPLATE_VERSION,
        text_components=qwen_image.VARIANTS[name].text_components,
        lora_loader=qwen_image.LORA_LOADER,
        default_size=lambda sizes, _name=name: qwen_image.default_size(_name, sizes),
        check_image_sizes=lambda sizes, _name=name: qwen_image.check_edit_sizes(_name, sizes),
        stages=("pipeline.QwenTextEncoder", "vae.QwenVae", "pipeline.QwenDenoiser"),
    )


FAMILIES: dict[str, Family] = {
    **{name: _qwen(name) for name in qwen_image.NAMES},
    z_image.NAME: Family(
        name=z_image.NAME,
        package="z_image",
        defaults=z_image.DEFAULTS[z_image.NAME],
        template_version=z_image.TEMPLATE_VERSION,
        text_components=z_image.TEXT_COMPONENTS,
        lora_loader=z_image.LORA_LOADER,
        default_size=lambda sizes: None,
        check_image_sizes=lambda sizes: None,  # takes no images
        stages=("pipeline.ZImageTextEncoder", "vae.ZImageVae", "pipeline.ZImageDenoiser"),
    ),
    qwen_image_21.NAME: Family(
        name=qwen_image_21.NAME,
        package="qwen_image_21",
        defaults=qwen_image_21.DEFAULTS[qwen_image_21.NAME],
        template_version=qwen_image_21.TEMPLATE_VERSION,
        text_components=qwen_image_21.TEXT_COMPONENTS,
        lora_loader=qwen_image_21.LORA_LOADER,
        default_size=lambda sizes: None,
        check_image_sizes=lambda sizes: None,  # served for text-to-image only: takes no images
        stages=("pipeline.Qwen21TextEncoder", "vae.Qwen21Vae", "pipeline.Qwen21Denoiser"),
    ),
}
# model_index.json's pipeline class -> family, and the classes each family's components may have.
FAMILY_BY_PIPELINE: dict[str, str] = {
    **qwen_image.PIPELINE_CLASSES,
    **z_image.PIPELINE_CLASSES,
    **qwen_image_21.PIPELINE_CLASSES,
}
SUPPORTED_CLASSES: dict[str, dict[str, set[str]]] = {
    **qwen_image.COMPONENT_CLASSES,
    **z_image.COMPONENT_CLASSES,
    **qwen_image_21.COMPONENT_CLASSES,
}


def get_family(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise ModelLoadError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return family
