"""The denoising loop: the one place where a step starts and ends.

Families supply `predict(latents, step) -> velocity` (their DiT forward(s) and CFG rule); the loop owns
cancellation, the Euler update and progress. Nothing here reads a device value back to the host, so a step
can later be captured whole (torch.compile / CUDA graphs).

A batch of jobs (`imagegen.common.batching`) runs through `run_batch_loop`: one `predict` call per step for
all of them, while each keeps its own latents, progress and stop decision (a member that stops leaves at a
step boundary; the others go on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save

from imagegen.common.checkpoint import ModelFolder
from imagegen.common.errors import Cancelled
from imagegen.common.graphs import GraphCache
from imagegen.common.kernels import CompileMarker, resolve_compile, resolve_kernels, should_compile
from imagegen.common.lora import AdapterCache, AdapterSlot
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule, euler_step
from imagegen.common.sharding import LOCAL, Sharding
from imagegen.common.stage_settings import StageSettings

Predict = Callable[[torch.Tensor, int], torch.Tensor]
# (indices of the members still running, their latents, step) -> their velocities, in the same order.
BatchPredict = Callable[[tuple[int, ...], list[torch.Tensor], int], list[torch.Tensor]]


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


def encode_batch(jobs: list[DenoiseJob], flags: list[dict[str, str]]) -> bytes:
    """Several jobs as one safetensors blob: each job's `encode_job` blob (with its flags) as a uint8 tensor."""
    blobs = [encode_job(job, **job_flags) for job, job_flags in zip(jobs, flags, strict=True)]
    return save({str(i): torch.frombuffer(bytearray(blob), dtype=torch.uint8) for i, blob in enumerate(blobs)})


def decode_batch(blob: bytes) -> tuple[list[DenoiseJob], list[dict[str, str]]]:
    """Inverse of `encode_batch`."""
    tensors = load(blob)
    decoded = [decode_job(tensors[str(i)].numpy().tobytes()) for i in range(len(tensors))]
    return [job for job, _ in decoded], [job_flags for _, job_flags in decoded]


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
    """Euler steps over `schedule` for one job (a batch of one); latents may be this rank's shard."""
    result = run_batch_loop(lambda _, lat, step: [predict(lat[0], step)], [latents], schedule, [hooks], sharding)
    return raise_or_return(result[0])


def run_batch_loop(
    predict: BatchPredict,
    latents: list[torch.Tensor],
    schedule: Schedule,
    hooks: list[StepHooks],
    sharding: Sharding = LOCAL,
) -> list[torch.Tensor | Cancelled]:
    """Euler steps over `schedule` for every member of a batch; each result is its final latents, or the
    `Cancelled` that made it leave before some step (the others are unaffected: every update is per member)."""
    total = schedule.num_steps
    latents = list(latents)
    results: list[torch.Tensor | Cancelled | None] = [None] * len(latents)
    active = tuple(range(len(latents)))
    for step in range(total):
        stops = _stop_decisions(sharding, [hooks[i] for i in active])
        for member, stop in zip(active, stops, strict=True):
            if stop:
                results[member] = Cancelled(f"stopped before step {step + 1} of {total}")
        active = tuple(m for m, stop in zip(active, stops, strict=True) if not stop)
        if not active:
            break
        velocities = predict(active, [latents[m] for m in active], step)
        for member, velocity in zip(active, velocities, strict=True):
            latents[member] = euler_step(latents[member], velocity, schedule, step)
            if hooks[member].on_step is not None:
                hooks[member].on_step(step + 1, total)
    for member in active:
        results[member] = latents[member]
    return results


def _stop_decisions(sharding: Sharding, hooks: list[StepHooks]) -> list[bool]:
    """Each member's stop decision, the same on every rank (rank 0's): one collective per step while nobody
    stops, and one per member only at a step where someone does."""
    wants = [h.should_stop is not None and h.should_stop() for h in hooks]
    if not sharding.should_stop(any(wants)):
        return [False] * len(hooks)
    if len(hooks) == 1:
        return [True]
    return [sharding.should_stop(want) for want in wants]


def raise_or_return(result: torch.Tensor | BaseException) -> torch.Tensor:
    if isinstance(result, BaseException):
        raise result
    return result


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
    same modules, `imagegen.common.kernels`) and implement `run_batch(jobs, hooks, sharding)`: jobs that share
    a batch key (`imagegen.common.batching.batch_key`) in one forward per step, one result per job."""

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
        settings: StageSettings = StageSettings(),
    ) -> None:
        """`settings`: kernel path, compile mode, CUDA graphs, adapter cache (`imagegen.common.stage_settings`)."""
        self._setup(folder.load("transformer", dtype, device), folder.scheduler_config(), settings)

    @classmethod
    def from_transformer(
        cls, transformer: torch.nn.Module, scheduler_config: dict, settings: StageSettings = StageSettings()
    ) -> DenoiseStage:
        """A stage over an already-built transformer (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(transformer, scheduler_config, settings)
        return stage

    def _setup(self, transformer: torch.nn.Module, scheduler_config: dict, settings: StageSettings) -> None:
        self.dit = self.dit_class(transformer)
        self.scheduler_config = dict(scheduler_config)
        self.device = transformer.device
        self.dtype = transformer.dtype
        self.settings = settings
        self.kernels = resolve_kernels(settings.kernels, self.device)
        self.compile_mode = resolve_compile(settings.compile)
        self.fast = self.fast_class(transformer) if self.kernels == "fast" else None
        self.graphs = GraphCache(enabled=settings.cuda_graphs)
        self._marker = CompileMarker(transformer, settings.cache_root)
        family = "z-image" if type(transformer).__name__.startswith("ZImage") else "qwen-image"
        self.adapters = AdapterCache(transformer, family, settings.lora_cache_bytes)
        self.lora_slot = AdapterSlot(transformer)
        self._base_scheduler_config = dict(self.scheduler_config)

    def use_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Merge the job's adapter set (load what the cache lacks); the base weights come back exactly as
        soon as a job with another set, or none, runs."""
        adapters = [(self.adapters.get(path), scale) for path, scale in loras]
        key = tuple((self.adapters.key(path), scale) for path, scale in loras)
        self.lora_slot.use(key, adapters)
        # A distilled adapter's NAME.json shift (the first in the set that has one) replaces the dynamic shift,
        # as `FlowMatchEulerDiscreteScheduler.from_config(config, shift=s, use_dynamic_shifting=False)` does.
        shift = next((adapter.scheduler_shift for adapter, _ in adapters if adapter.scheduler_shift), None)
        config = dict(self._base_scheduler_config)
        if shift is not None:
            config.update(shift=shift, use_dynamic_shifting=False)
        self.scheduler_config = config

    def run(self, job: DenoiseJob, hooks: StepHooks | None = None, sharding: Sharding = LOCAL) -> torch.Tensor:
        """One job: a batch of one (a stop raises `Cancelled`)."""
        return raise_or_return(self.run_batch([job], [hooks or StepHooks()], sharding)[0])

    def run_batch(
        self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding = LOCAL
    ) -> list[torch.Tensor | BaseException]:
        raise NotImplementedError

    def uses_fast_path(self, sharding: Sharding) -> bool:
        """The fast path runs where the whole sequence is on this process (CFG may still be split); a
        sequence-parallel group keeps the reference kernels around its all-to-all."""
        return self.fast is not None and sharding.sp_size == 1

    def compile_for(self, forwards: int) -> bool:
        """Whether this job's forwards run compiled (see `imagegen.common.kernels.should_compile`)."""
        return should_compile(self.compile_mode, forwards, self._marker, self.device)

    def compiled_forward_ran(self) -> None:
        self._marker.write()
