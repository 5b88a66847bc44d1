"""The rows of a timestep-only computation (time embedding, adaLN modulation) as diffusers' own calls make them.

Every row of such a computation has the same input (one timestep per step), yet a CPU GEMM rounds a row
differently with the number of rows M in the call (MKL: M = 1, 2-3 and >= 4 are three classes here). diffusers
runs each job's step as calls of a fixed row count (Z-Image: one call of 2K rows with CFG, K without; Qwen-Image:
one call of K rows per branch), while our forwards hold other counts (one branch per CFG-parallel rank, several
jobs in a batch). So each forward row names the diffusers call it stands for (its row count, its row in it);
`CallRows` runs the computation once per distinct call size and takes every forward row from its call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CallRows:
    """`sizes`: the distinct diffusers call sizes, ascending; `index` `[B]`: the row of
    `cat([call(size) for size in sizes])` that each forward row takes (None: one call, taken whole in order)."""

    sizes: tuple[int, ...]
    index: torch.Tensor | None

    @classmethod
    def of(cls, rows: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> CallRows:
        """`rows[r]` = (rows of the diffusers call that forward row r stands for, its row within that call)."""
        sizes = tuple(sorted({size for size, _ in rows}))
        if sizes == (len(rows),) and [row for _, row in rows] == list(range(len(rows))):
            return cls(sizes, None)
        offsets = dict(zip(sizes, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
        index = torch.tensor([offsets[size] + row for size, row in rows], dtype=torch.long, device=device)
        return cls(sizes, index)

    @classmethod
    def for_members(
        cls,
        counts: Sequence[int],
        local: Sequence[str],
        names: Sequence[str],
        device: torch.device | str = "cpu",
    ) -> CallRows:
        """A forward whose rows are branch-major over `local` (a subset of the step's branches `names`, in that
        order), members in order within a branch with `counts[m]` rows each, where diffusers runs every member
        alone as one call of `len(names) * counts[m]` rows, branch-major in `names` order (Z-Image's CFG batch)."""
        rows = [
            (len(names) * count, names.index(name) * count + i)
            for name in local
            for count in counts
            for i in range(count)
        ]
        return cls.of(rows, device)

    def timesteps(self, timestep: torch.Tensor) -> list[torch.Tensor]:
        """Each call's timestep input: the step's `[1]` timestep repeated to the call's rows."""
        return [timestep.expand(size) for size in self.sizes]

    def take(self, calls: Sequence[torch.Tensor]) -> torch.Tensor:
        """The forward's rows out of the calls' outputs (one per size, in `sizes` order)."""
        if self.index is None:
            return calls[0]
        return torch.cat(list(calls)).index_select(0, self.index)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], calls: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fn` on each call's rows, then the forward's rows of the results."""
        return self.take([fn(call) for call in calls])
