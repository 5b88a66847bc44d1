"""The denoising loop: the one place where a step starts and ends, and the pieces every family's loop shares.

`DenoiseStage.run_batch` is the entry: it checks the batch, merges its LoRA set, then runs the family's
`denoise`. A family's `denoise` prepares its latents and a `predict(active, latents, step) -> velocities`
(its DiT forward on the reference or the fast kernels, then `member_velocities`: each member's rows, hooks and
CFG rule); `run_batch_loop` owns cancellation, the Euler update and progress. Nothing here reads a device
value back to the host, so a step can be captured whole (torch.compile / CUDA graphs).

A batch of jobs (`imagegen.common.batching`) runs one `predict` call per step for all of them, while each keeps
its own latents, progress and stop decision (a member that stops leaves at a step boundary; the others go on).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from safetensors.torch import load, save

from imagegen.common.batching import check_batch, member_rows
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.errors import Cancelled
from imagegen.common.graphs import GraphCache
from imagegen.common.kernels import CompileMarker, resolve_compile, resolve_kernels, should_compile
from imagegen.common.lora import AdapterCache, AdapterSlot
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule, euler_step
from imagegen.common.sharding import LOCAL, Sharding
from imagegen.common.stage_settings import StageSettings

# (indices of the members still running, their latents, step) -> their velocities, in the same order.
BatchPredict = Callable[[tuple[int, ...], list[torch.Tensor], int], list[torch.Tensor]]
# (member, its branch outputs in branch order, step) -> its velocity: the family's CFG rule.
Combine = Callable[[int, list[torch.Tensor], int], torch.Tensor]

V = TypeVar("V")
BRANCHES = ("positive", "negative")  # CFG branches, in the order every family combines them


@dataclass
class DenoiseJob:
    """Everything the denoise stage needs; every tensor here is on the CPU and serialisable."""

    options: ResolvedOptions
    prompt_embeds: torch.Tensor  # [L, D]
    negative_embeds: torch.Tensor | None = None  # [L', D]; present exactly when CFG runs
    condition_latents: torch.Tensor | None = None  # edit images, family-specific packed layout
    condition_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    # LoRA adapters as (resolved .safetensors path, scale), in request order; every rank of a group applies
    # this same set, and jobs with different sets never share a forward (`imagegen.common.batching.batch_key`).
    loras: tuple[tuple[str, float], ...] = ()

    def embeds(self, branch: str) -> torch.Tensor:
        """The text embeddings of CFG branch `branch` ("positive" or "negative")."""
        embeds = self.prompt_embeds if branch == "positive" else self.negative_embeds
        assert embeds is not None, f"the job has no {branch} branch"
        return embeds


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
    # `after_step(step, latents) -> latents` rewrites a member's latents right after its Euler step, in the
    # loop's layout (inpainting's blend of known latents, `imagegen.common.conditioning.blend_known`).
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def model_output(self, step: int, branch: str, output: torch.Tensor) -> None:
        if self.on_model_output is not None:
            self.on_model_output(step, branch, output)


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
            if hooks[member].after_step is not None:
                latents[member] = hooks[member].after_step(step, latents[member])
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


def branch_names(cfg: bool) -> list[str]:
    """The CFG branches a job runs: both with CFG, the positive one alone without."""
    return list(BRANCHES) if cfg else [BRANCHES[0]]


def member_velocities(
    active: tuple[int, ...],
    counts: list[int],
    names: list[str],
    outputs: list[torch.Tensor],
    hooks: list[StepHooks],
    step: int,
    combine: Combine,
    as_seen: Callable[[torch.Tensor], torch.Tensor] = lambda output: output,
) -> list[torch.Tensor]:
    """The per-member step of every family and kernel path: cut each active member's rows (members in order,
    `counts[m]` rows each) out of the batched outputs of the branches `names`, show them to its hooks (as the
    caller sees a whole output: `as_seen`, only when a hook is installed) and `combine` them into its velocity."""
    velocities = []
    for member, (lo, hi) in zip(active, member_rows([counts[m] for m in active]), strict=True):
        mine = [output[lo:hi] for output in outputs]
        if hooks[member].on_model_output is not None:
            for name, output in zip(names, mine, strict=True):
                hooks[member].model_output(step, name, as_seen(output))
        velocities.append(combine(member, mine, step))
    return velocities


class PerActiveSet(Generic[V]):
    """What a loop builds for the set of members still running (stacked inputs, forwards), by key; everything
    is dropped when a member leaves: the old stacking is never used again."""

    def __init__(self, build: Callable[..., V]) -> None:
        self._build = build  # (active, *key) -> value
        self._active: tuple[int, ...] | None = None
        self._values: dict[Hashable, V] = {}

    def __call__(self, active: tuple[int, ...], *key: Hashable) -> V:
        if active != self._active:
            self._active, self._values = active, {}
        if key not in self._values:
            self._values[key] = self._build(active, *key)
        return self._values[key]


class DenoiseStage:
    """Base of the families' denoise stages: their DiT forward over a loaded transformer, plus its scheduler
    config. Subclasses name `dit_class` (the reference forward), `fast_class` (the fast-path forward over the
    same modules, `imagegen.common.kernels`) and `lora_family` (whose adapter formats the transformer takes),
    and implement `denoise(jobs, hooks, sharding)`: one loop, the kernel path a choice inside it."""

    dit_class: type
    fast_class: type
    lora_family: str

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
        self.adapters = AdapterCache(transformer, self.lora_family, settings.lora_cache_bytes)
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

    @torch.no_grad()
    def run_batch(
        self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding = LOCAL
    ) -> list[torch.Tensor | BaseException]:
        """Jobs that share a batch key (`imagegen.common.batching.batch_key`) in one forward per step; per job
        its final latents, or the `Cancelled` that stopped it."""
        check_batch(jobs)
        # The batch's one adapter set (it is part of the key) is merged before the first forward, so no
        # forward runs on another request's adapters, nor on leftovers: no adapters restores the base weights.
        self.use_loras(jobs[0].loras)
        return self.denoise(jobs, hooks, sharding)

    def denoise(
        self, jobs: list[DenoiseJob], hooks: list[StepHooks], sharding: Sharding
    ) -> list[torch.Tensor | BaseException]:
        """The family's loop over a checked batch whose adapters are merged."""
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
