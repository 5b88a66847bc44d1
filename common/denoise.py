"""The denoising loop: the one place where a step starts and ends.

Families supply `predict(latents, step) -> velocity` (their DiT forward(s) and CFG rule); the loop owns
cancellation, the Euler update and progress. Nothing here reads a device value back to the host, so a step
can later be captured whole (torch.compile / CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.errors import Cancelled
from common.options import ResolvedOptions
from common.schedule import Schedule, euler_step

Predict = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class DenoiseJob:
    """Everything the denoise stage needs; every tensor here is on the CPU and serialisable."""

    options: ResolvedOptions
    prompt_embeds: torch.Tensor  # [L, D]
    negative_embeds: torch.Tensor | None = None  # [L', D]; present exactly when CFG runs
    condition_latents: torch.Tensor | None = None  # edit images, family-specific packed layout
    condition_shapes: list[tuple[int, int, int]] = field(default_factory=list)


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


def run_denoise_loop(predict: Predict, latents: torch.Tensor, schedule: Schedule, hooks: StepHooks) -> torch.Tensor:
    total = schedule.num_steps
    for step in range(total):
        if hooks.should_stop is not None and hooks.should_stop():
            raise Cancelled(f"stopped before step {step + 1} of {total}")
        velocity = predict(latents, step)
        latents = euler_step(latents, velocity, schedule, step)
        if hooks.on_step is not None:
            hooks.on_step(step + 1, total)
    return latents
