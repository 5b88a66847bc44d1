"""The denoising loop: the one place where a step starts and ends.

Families supply `predict(latents, step) -> velocity` (their DiT forward(s) and CFG rule); the loop owns
cancellation, the Euler update and progress. Nothing here reads a device value back to the host, so a step
can later be captured whole (torch.compile / CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.errors import Cancelled
from imagegen.common.graphs import GraphCache
from imagegen.common.kernels import CompileMarker, resolve_compile, resolve_kernels, should_compile
from imagegen.common.lora import AdapterCache, AdapterSlot
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule, euler_step
from imagegen.common.sharding import LOCAL, Sharding
from safetensors.torch import load, save

Predict = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class DenoiseJob:
    """Everything the denoise stage needs; every tensor here is on the CPU and serialisable."""

    options: ResolvedOptions
    prompt_embeds: torch.Tensor  # [L, D]
    negative_embeds: torch.Tensor | None = None  # [L', D]; present exactly when CFG runs
    condition_latents: torch.Tensor | None = None  # edit images, family-specific packed layout
    condition_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    # LoRA adapters as (resolved .safetensors path, scale), in request order; every rank of a group applies
    # this same set, and jobs with different sets never share a forward (`lora_key`).
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        return self.loras


_TENSOR_FIELDS = ("prompt_embeds", "negative_embeds", "condition_latents")


def encode_job(job: DenoiseJob, **flags: str) -> bytes:
    """A job as one safetensors blob: its tensors, with options and shapes as JSON in the header metadata."""
    tensors = {name: getattr(job, name).contiguous() for name in _TENSOR_FIELDS if getattr(job, name) is not None}
    metadata = {
        "options": json.dumps(dataclasses.asdict(job.options)),
        "condition_shapes": json.dumps(job.condition_shapes),
        "loras": json.dumps(job.loras),
        **flags,
    }
    return save(tensors, metadata=metadata)


def decode_job(blob: bytes) -> tuple[DenoiseJob, dict[str, str]]:
    """Inverse of `encode_job`: the job and the extra string flags."""
    tensors = load(blob)
    metadata = _header_metadata(blob)
    options = ResolvedOptions(**json.loads(metadata.pop("options")))
    shapes = [tuple(s) for s in json.loads(metadata.pop("condition_shapes"))]
    loras = tuple((str(path), float(scale)) for path, scale in json.loads(metadata.pop("loras", "[]")))
    job = DenoiseJob(options, *(tensors.get(name) for name in _TENSOR_FIELDS), shapes, loras)
    return job, metadata


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (8-byte little-endian header length, then JSON)."""
    header_len = int.from_bytes(blob[:8], "little")
    return dict(json.loads(blob[8 : 8 + header_len]).get("__metadata__", {}))


@dataclass
class StepHooks:
    """Callbacks around the loop. `on_step(done, total)` after each step; `should_stop()` before each step
    (cancellation, deadlines); `on_model_output(step, branch, output)` sees every raw DiT output (tests)."""

    on_step: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_model_output: Callable[[int, str, torch.Tensor], None] | None = None

    def model_output(self, step: int, branch: str, output: torch.Tensor) -> None:
        if self.on_model_output is not None:
            self.on_model_output(step, branch, output)


def run_denoise_loop(
    predict: Predict, latents: torch.Tensor, schedule: Schedule, hooks: StepHooks, sharding: Sharding = LOCAL
) -> torch.Tensor:
    """Euler steps over `schedule`; latents may be this rank's shard (every update is per token)."""
    total = schedule.num_steps
    for step in range(total):
        # Every rank of a group takes the same decision (rank 0's), so none is left inside a collective.
        if sharding.should_stop(hooks.should_stop is not None and hooks.should_stop()):
            raise Cancelled(f"stopped before step {step + 1} of {total}")
        velocity = predict(latents, step)
        latents = euler_step(latents, velocity, schedule, step)
        if hooks.on_step is not None:
            hooks.on_step(step + 1, total)
    return latents


def applies_loras(run: Callable) -> Callable:
    """Wraps a stage's `run(job, ...)` or `run_batch(jobs, ...)`: the job's LoRA set is merged before the
    first forward (a batch shares one set: `imagegen.common.batching.batch_key` holds it)."""

    @functools.wraps(run)
    def wrapper(self: DenoiseStage, job, *args, **kwargs):
        jobs = job if isinstance(job, list | tuple) else [job]
        sets = {member.lora_key for member in jobs}
        if len(sets) > 1:
            raise ValueError("jobs with different LoRA sets cannot share a forward")
        self.use_loras(jobs[0].loras if jobs else ())
        return run(self, job, *args, **kwargs)

    wrapper.applies_loras = True
    return wrapper


class DenoiseStage:
    """Base of the families' denoise stages: their DiT forward over a loaded transformer, plus its scheduler
    config. Subclasses name `dit_class` (the reference forward) and `fast_class` (the fast-path forward over the
    same modules, `imagegen.common.kernels`) and implement `run(job, hooks, sharding) -> latents`."""

    dit_class: type
    fast_class: type

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Every entry point a family defines merges its job's LoRA set first, so no forward ever runs on
        # another request's adapters (nor on leftovers: a job without adapters restores the base weights).
        for name in ("run", "run_batch"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "applies_loras", False):
                setattr(cls, name, applies_loras(method))

    def __init__(
        self,
        folder: ModelFolder,
        dtype: torch.dtype,
        device: torch.device | str,
        kernels: str | None = None,
        compile: str | None = None,
    ) -> None:
        self._setup(folder.load("transformer", dtype, device), folder.scheduler_config(), kernels, compile)

    @classmethod
    def from_transformer(
        cls,
        transformer: torch.nn.Module,
        scheduler_config: dict,
        kernels: str | None = None,
        compile: str | None = None,
    ) -> DenoiseStage:
        """A stage over an already-built transformer (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(transformer, scheduler_config, kernels, compile)
        return stage

    def _setup(self, transformer: torch.nn.Module, scheduler_config: dict, kernels: str | None, compile) -> None:
        self.dit = self.dit_class(transformer)
        self.scheduler_config = dict(scheduler_config)
        self.device = transformer.device
        self.dtype = transformer.dtype
        self.kernels = resolve_kernels(kernels, self.device)
        self.compile_mode = resolve_compile(compile)
        self.fast = self.fast_class(transformer) if self.kernels == "fast" else None
        self.graphs = GraphCache()
        self._marker = CompileMarker(transformer)
        family = "z-image" if type(transformer).__name__.startswith("ZImage") else "qwen-image"
        self.adapters = AdapterCache(transformer, family)
        self.lora_slot = AdapterSlot(transformer)

    def use_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Merge the job's adapter set (load what the cache lacks); the base weights come back exactly as
        soon as a job with another set, or none, runs."""
        adapters = [(self.adapters.get(path), scale) for path, scale in loras]
        key = tuple((self.adapters.key(path), scale) for path, scale in loras)
        self.lora_slot.use(key, adapters)

    def uses_fast_path(self, sharding: Sharding) -> bool:
        """The fast path runs where the whole sequence is on this process (CFG may still be split); a
        sequence-parallel group keeps the reference kernels around its all-to-all."""
        return self.fast is not None and sharding.sp_size == 1

    def compile_for(self, forwards: int) -> bool:
        """Whether this job's forwards run compiled (see `imagegen.common.kernels.should_compile`)."""
        return should_compile(self.compile_mode, forwards, self._marker, self.device)

    def compiled_forward_ran(self) -> None:
        self._marker.write()
