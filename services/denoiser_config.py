"""`DenoiserConfig`: everything `serve denoiser` was told, typed, built once from the flags.

The argparse `Namespace` stops here: the servicer, the engine and the group get this frozen value (and the
group's ranks its `GroupSpec`), so no code past the flag layer guesses a default with `getattr`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from imagegen.common.model_defaults import DEFAULTS_FILE, check_model_defaults, overlay, read_model_defaults
from imagegen.common.options import Limits, ModelDefaults
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.serving.config import limits_from_args, redis_password
from imagegen.common.serving.hosting import HostedModel
from imagegen.common.stage_settings import StageSettings
from imagegen.services.flags import CUDA_MAX_BATCH


@dataclass(frozen=True)
class RedisConfig:
    url: str
    ttl_s: int
    timeout_s: float
    password: str | None  # from a Secret (IMAGEGEN_REDIS_PASSWORD), never a flag


@dataclass(frozen=True)
class DenoiserConfig:
    group: GroupSpec  # model, layout, dtype, device, timeouts, threads and the stage's settings (every rank's)
    queue_size: int
    max_batch: int  # jobs per forward; the device's default applied
    batch_wait_s: float
    warmup_sizes: str  # `--warmup-sizes` as given (parsed against the family by `imagegen.common.warmup`)
    lora_dir: str | None
    redis: RedisConfig | None  # None: embeddings arrive inline
    default_timeout_s: float  # a request without a deadline
    limits: Limits
    model_defaults: ModelDefaults  # imagegen.json beside the model, under the --default-* flags

    @property
    def stage(self) -> StageSettings:
        return self.group.stage

    @property
    def grouped(self) -> bool:
        """More than one process runs the denoise stage (or torchrun started this one)."""
        return self.group.world > 1

    @classmethod
    def from_flags(cls, args: argparse.Namespace, model: HostedModel) -> DenoiserConfig:
        stage = StageSettings(
            kernels=args.kernels,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            lora_cache_bytes=args.lora_cache_mb << 20,
            cache_root=args.cache_dir,
        )
        limits = limits_from_args(args)
        flags = ModelDefaults(
            steps=args.default_steps,
            guidance_scale=args.default_guidance_scale,
            width=args.default_width,
            height=args.default_height,
            negative_prompt=args.default_negative_prompt,
        )
        defaults = overlay(read_model_defaults(model.folder.path), flags)
        source = f"the model defaults ({model.folder.path / DEFAULTS_FILE} and the --default-* flags)"
        check_model_defaults(defaults, model.family.name, model.family.defaults, limits, source)
        redis = None
        if args.redis_url:
            redis = RedisConfig(args.redis_url, args.cache_ttl, args.redis_timeout, redis_password())
        return cls(
            group=GroupSpec.from_flags(args, args.model, str(model.dtype), model.device, stage),
            queue_size=args.queue_size,
            max_batch=args.max_batch or default_max_batch(model.device),
            batch_wait_s=args.batch_wait_ms / 1000,
            warmup_sizes=args.warmup_sizes,
            lora_dir=args.lora_dir,
            redis=redis,
            default_timeout_s=args.default_timeout,
            limits=limits,
            model_defaults=defaults,
        )


def default_max_batch(device: str) -> int:
    """1 on the CPU (a forward there is compute-bound already) and `CUDA_MAX_BATCH` (also 1, measured) on a GPU."""
    return CUDA_MAX_BATCH if str(device).startswith("cuda") else 1
