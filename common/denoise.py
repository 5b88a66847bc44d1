"""The denoising loop: the one place where a step starts and ends.

Families supply `predict(latents, step) -> velocity` (their DiT forward(s) and CFG rule); the loop owns
cancellation, the Euler update and progress. Nothing here reads a device value back to the host, so a step
can later be captured whole (torch.compile / CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from imagegen.common.checkpoint import ModelFolder
from imagegen.common.errors import Cancelled
from imagegen.common.graphs import GraphCache
from imagegen.common.kernels import CompileMarker, resolve_compile, resolve_kernels, should_compile
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


_TENSOR_FIELDS = ("prompt_embeds", "negative_embeds", "condition_latents")


def encode_job(job: DenoiseJob, **flags: str) -> bytes:
    """A job as one safetensors blob: its tensors, with options and shapes as JSON in the header metadata."""
    tensors = {name: getattr(job, name).contiguous() for name in _TENSOR_FIELDS if getattr(job, name) is not None}
    metadata = {
        "options": json.dumps(dataclasses.asdict(job.options)),
        "condition_shapes": json.dumps(job.condition_shapes),
        **flags,
    }
    return save(tensors, metadata=metadata)


def decode_job(blob: bytes) -> tuple[DenoiseJob, dict[str, str]]:
    """Inverse of `encode_job`: the job and the extra string flags."""
    tensors = load(blob)
    metadata = _header_metadata(blob)
    options = ResolvedOptions(**json.loads(metadata.pop("options")))
    shapes = [tuple(s) for s in json.loads(metadata.pop("condition_shapes"))]
    job = DenoiseJob(options, *(tensors.get(name) for name in _TENSOR_FIELDS), shapes)
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


class DenoiseStage:
    """Base of the families' denoise stages: their DiT forward over a loaded transformer, plus its scheduler
    config. Subclasses name `dit_class` (the reference forward) and `fast_class` (the fast-path forward over the
    same modules, `imagegen.common.kernels`) and implement `run(job, hooks, sharding) -> latents`."""

    dit_class: type
    fast_class: type

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

    def uses_fast_path(self, sharding: Sharding) -> bool:
        """The fast path runs where the whole sequence is on this process (CFG may still be split); a
        sequence-parallel group keeps the reference kernels around its all-to-all."""
        return self.fast is not None and sharding.sp_size == 1

    def compile_for(self, forwards: int) -> bool:
        """Whether this job's forwards run compiled (see `imagegen.common.kernels.should_compile`)."""
        return should_compile(self.compile_mode, forwards, self._marker, self.device)

    def compiled_forward_ran(self) -> None:
        self._marker.write()
