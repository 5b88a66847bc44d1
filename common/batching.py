"""Which denoise jobs may share one DiT forward per step, and the tensors that stack them.

Jobs batch when everything that fixes the shape and the arithmetic of a step is equal: the model and kernel
path (one per denoiser process, so implicit here), the output size and edit-image grids (token counts, RoPE
tables), the step count and schedule (sigmas and shift follow from the steps, the size and the model's
scheduler config), CFG on or off (and Z-Image's `cfg_truncation`, which decides per step whether the negative
branch runs) and the adapter set. Prompt, negative prompt, seed, guidance scale, `cfg_normalization` and
num_images may differ: they only change a member's rows (its text, its noise) or its own CFG combination.
Texts of different lengths are padded to the longest, and attention runs per row over exactly that row's real
tokens (`imagegen.common.attention.joint_by_length`, `imagegen.common.kernels.attention_rows`), so padding
never reaches a real token and a member's image equals its image alone.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # `imagegen.common.denoise` imports this module
    from imagegen.common.denoise import DenoiseJob


def batch_key(job: DenoiseJob) -> Hashable:
    """Jobs with equal keys may be denoised in one batch (see the module docstring)."""
    o = job.options
    return (
        o.family,
        o.width,
        o.height,
        o.steps,
        o.uses_cfg,
        o.cfg_truncation if o.uses_cfg else None,
        tuple(tuple(shape) for shape in job.condition_shapes),
        job.loras,  # the adapter set (files and scales, in order): the weights are merged per set
    )


def check_batch(jobs: list[DenoiseJob]) -> None:
    """A batch must share one key: the stages rely on it (one schedule, one sequence layout)."""
    if len({job.loras for job in jobs}) > 1:
        raise ValueError("jobs with different LoRA sets cannot share a forward (the weights are merged per set)")
    keys = {batch_key(job) for job in jobs}
    if len(keys) != 1:
        raise ValueError(f"jobs of {len(keys)} different batch keys cannot share a forward")


def member_rows(counts: list[int]) -> list[tuple[int, int]]:
    """(start, end) batch rows of each member that holds `counts[i]` rows (its images) within one branch."""
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def stack_padded(tensors: list[torch.Tensor], counts: list[int], length: int) -> torch.Tensor:
    """Member tensors `[L_i, D]` -> `[sum(counts), length, D]`: member i's rows repeated `counts[i]` times,
    zero-padded after its own length."""
    return torch.cat(
        [F.pad(t, (0, 0, 0, length - t.shape[0]))[None].expand(n, -1, -1) for t, n in zip(tensors, counts, strict=True)]
    )


def row_lengths(lengths: list[int], counts: list[int]) -> tuple[int, ...]:
    """Each batch row's real text length (member i's length, `counts[i]` times)."""
    return tuple(n for n, count in zip(lengths, counts, strict=True) for _ in range(count))
