"""Flow-matching schedule and the Euler step, shared by every family.

The sigmas come from the checkpoint's own `FlowMatchEulerDiscreteScheduler.set_timesteps`, called exactly as
the diffusers pipelines call it (`sigmas=` and `mu=`), so dynamic `mu` shifting, static shifting and the
terminal stretch are the scheduler's, not a copy. The step itself is reimplemented with its exact dtype
behaviour so the loop keeps everything on the device and needs no scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def calculate_shift(image_seq_len: int, scheduler_config: dict) -> float:
    """The pipelines' linear `mu` (no clamping; extrapolates beyond `max_image_seq_len`)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


@dataclass(frozen=True)
class Schedule:
    """`sigmas` has N+1 entries (terminal 0 appended), `timesteps` N (= sigmas * 1000), both float32."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.sigmas.to(device), self.timesteps.to(device))


def make_schedule(scheduler_config: dict, base_sigmas: np.ndarray | list[float], image_seq_len: int) -> Schedule:
    """Run the checkpoint scheduler's `set_timesteps(sigmas=..., mu=...)` on the CPU and keep its tensors."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(image_seq_len, scheduler_config)
    scheduler.set_timesteps(sigmas=base_sigmas, mu=mu, device="cpu")
    return Schedule(scheduler.sigmas.clone(), scheduler.timesteps.clone())


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, schedule: Schedule, step: int) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler.step`: upcast the sample, add `dt * v`, cast back to `v`'s dtype.

    `dt` is a 0-dim float32 tensor, so `dt * velocity` is computed in the velocity's dtype before the float32
    add, as in the scheduler.
    """
    dt = schedule.sigmas[step + 1] - schedule.sigmas[step]
    return (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)
