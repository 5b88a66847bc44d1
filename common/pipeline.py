"""All four stages in one process: the embedded default behind `imagegen generate/edit` without `--target`.

Each stage object is the same one a service hosts; this class only wires them in order
(encode -> VAE-encode edit images -> denoise -> decode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from imagegen.common.checkpoint import ModelFolder, open_model_folder, parse_device, parse_dtype
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families import Family, get_family
from imagegen.common.images import to_float_array
from imagegen.common.lora.registry import (
    LoraRegistry,
    check_lora_scales,
    read_defaults,
    resolve_source,
    with_lora_defaults,
)
from imagegen.common.model_defaults import read_model_defaults
from imagegen.common.options import Limits, ModelDefaults, RequestOptions, ResolvedOptions, resolve_options
from imagegen.common.stage_settings import StageSettings
from imagegen.common.validation import check_lora_fit


def resolve_for(
    family: Family,
    options: RequestOptions,
    images: Sequence[PIL.Image.Image],
    limits: Limits = Limits(),
    model: ModelDefaults = ModelDefaults(),
) -> ResolvedOptions:
    """`resolve_options` for this family: the edit size from `images`, the deployment's `model` defaults."""
    sizes = [im.size for im in images]
    default = family.default_size(sizes) if sizes else None
    return resolve_options(family.name, family.defaults, options, len(images), limits, default, model)


class Pipeline:
    def __init__(
        self,
        model_dir: str | Path | ModelFolder,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        *,
        denoiser=None,
        kernels: str | None = None,
        compile: str | None = None,
        lora_dir: str | Path | None = None,
        settings: StageSettings | None = None,
    ) -> None:
        """`lora_dir` names adapters (`imagegen.common.lora`); `denoiser` replaces the one-process denoise stage
        (e.g. rank 0's handle on a parallel group); `settings` configure the denoise stage (`kernels` and
        `compile` alone are the common case: the kernel path, default by device, `imagegen.common.kernels`).
        Requests resolve against the folder's `imagegen.json` defaults (`imagegen.common.model_defaults`)."""
        self.folder = model_dir if isinstance(model_dir, ModelFolder) else open_model_folder(model_dir)
        self.family = get_family(self.folder.family)
        self.model_defaults = read_model_defaults(self.folder.path)
        dtype, device = parse_dtype(dtype), parse_device(device)
        settings = settings or StageSettings(kernels=kernels, compile=compile)
        self.text_encoder = self.family.text_encoder(self.folder, dtype, device)
        self.vae = self.family.vae(self.folder, dtype, device)
        self.denoiser = denoiser or self.family.denoiser(self.folder, dtype, device, settings)
        self.loras = LoraRegistry(lora_dir)

    def lora_set(self, specs: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """(NAME_OR_PATH, scale) pairs -> the job's (resolved file, scale) pairs."""
        check_lora_scales(specs)
        loras = tuple(
            (str(resolve_source(spec, self.loras, f"loras[{i}].name").resolve()), float(scale))
            for i, (spec, scale) in enumerate(specs)
        )
        check_lora_fit(self.denoiser, loras, [spec for spec, _ in specs])
        return loras

    def with_lora_defaults(self, options: RequestOptions, specs: Sequence[tuple[str, float]]) -> RequestOptions:
        """Unset steps / guidance scale from the adapters' NAME.json (beside each NAME.safetensors)."""
        defaults = []
        for i, (spec, _) in enumerate(specs):
            path = resolve_source(spec, self.loras, f"loras[{i}].name")
            try:
                defaults.append(read_defaults(path.with_suffix(".json")))
            except ValueError as exc:  # also a malformed JSON file
                raise InvalidArgument(f"loras[{i}].name", str(exc)) from exc
        return with_lora_defaults(options, defaults)

    def resolve(self, options: RequestOptions, images: Sequence[PIL.Image.Image] = ()) -> ResolvedOptions:
        return resolve_for(self.family, options, images, model=self.model_defaults)

    def job(self, resolved: ResolvedOptions, images: Sequence[PIL.Image.Image] = ()) -> DenoiseJob:
        return self.job_condition(self.job_text(resolved, images), images)

    def job_text(self, resolved: ResolvedOptions, images: Sequence[PIL.Image.Image] = ()) -> DenoiseJob:
        """The encode stage: prompt (and negative) embeddings, with the edit images as vision tokens."""
        images = list(images)
        encode = self.text_encoder.encode
        prompt_embeds = encode(resolved.prompt, images, resolved.max_sequence_length)
        negative = None
        if resolved.uses_cfg:
            negative = encode(resolved.negative_prompt, images, resolved.max_sequence_length)
        return DenoiseJob(resolved, prompt_embeds, negative)

    def job_condition(self, job: DenoiseJob, images: Sequence[PIL.Image.Image] = ()) -> DenoiseJob:
        """The VAE-encode stage of edits: the input images as packed condition latents."""
        if not images:
            return job
        condition, shapes = self.vae.encode_condition(list(images))
        return dataclasses.replace(job, condition_latents=condition, condition_shapes=shapes)

    def __call__(
        self,
        options: RequestOptions,
        images: Sequence[PIL.Image.Image] = (),
        hooks: StepHooks | None = None,
        loras: Sequence[tuple[str, float]] = (),
    ) -> np.ndarray:
        """Float32 images `[K, H, W, 3]` in [0, 1]; `loras` as (adapter name or .safetensors path, scale)."""
        options = self.with_lora_defaults(options, loras)
        job = dataclasses.replace(self.job(self.resolve(options, images), images), loras=self.lora_set(loras))
        return self.run_job(job, hooks)

    def run_job(self, job: DenoiseJob, hooks: StepHooks | None = None, denoiser=None) -> np.ndarray:
        """Denoise and decode an already encoded job (optionally on another denoiser, e.g. a group)."""
        return self.decode((denoiser or self.denoiser).run(job, hooks), job)

    def decode(self, latents: torch.Tensor, job: DenoiseJob) -> np.ndarray:
        """A job's final latents as float32 images `[K, H, W, 3]` in [0, 1]."""
        return to_float_array(self.vae.decode(latents, job.options.width, job.options.height))
