"""How one process's share of a denoise job is laid out: the sequence plan and the sharding interface.

A DiT's sharded sequence is a list of segments (Qwen: the noisy tokens, then each edit image; Z-Image: its
image tokens including the 32-alignment registers). Under sequence parallelism every segment is split
contiguously into P blocks of `ceil(n / P)` rows, so every sharded token keeps its single-process index (and so
its RoPE row); a rank's local sequence is its block of every segment, in segment order, and blocks shorter
than `ceil(n / P)` are filled with padding rows that attention leaves out. A local sequence shorter than
`MIN_LOCAL_ROWS` gets more padding rows at its end. After the all-to-all the gathered rows are put back into
single-process order with the padding last (`SequencePlan.gathered_order`), so every query sees its keys in the
order one process would.

`LocalSharding` is the one-process case; `imagegen.common.parallel` provides the group implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from imagegen.common.attention import LOCAL_ATTENTION, AttentionBackend

# CPU GEMMs (MKL/oneDNN) take another kernel, and so another summation order, for a few rows (seen: fewer than 12
# and not a multiple of 4 with AVX-512; below 16 with AVX2), so a rank's rows would round unlike the same rows of
# one process. A sharded local sequence is never shorter than this (the extra rows are padding).
MIN_LOCAL_ROWS = 16


@dataclass(frozen=True)
class SequencePlan:
    segments: tuple[int, ...]
    world: int = 1
    rank: int = 0

    def block(self, segment: int) -> int:
        return math.ceil(self.segments[segment] / self.world)

    @cached_property
    def _blocks_len(self) -> int:
        return sum(self.block(s) for s in range(len(self.segments)))

    @cached_property
    def tail_padding(self) -> int:
        """Padding rows after the last segment's block, to make the local sequence `MIN_LOCAL_ROWS` long."""
        return 0 if self.world == 1 else max(0, MIN_LOCAL_ROWS - self._blocks_len)

    @cached_property
    def local_len(self) -> int:
        return self._blocks_len + self.tail_padding

    @cached_property
    def num_tokens(self) -> int:
        return sum(self.segments)

    def segment_range(self, segment: int, rank: int | None = None) -> tuple[int, int]:
        """The rows of `segment` (indices within the segment) that `rank` holds."""
        rank = self.rank if rank is None else rank
        block, length = self.block(segment), self.segments[segment]
        return min(rank * block, length), min((rank + 1) * block, length)

    def _rank_rows(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into the whole single-process sequence, is-real) for each local row of `rank`."""
        index, real = [], []
        offset = 0
        for s, length in enumerate(self.segments):
            start, end = self.segment_range(s, rank)
            block = self.block(s)
            index.append(torch.arange(offset + start, offset + end))
            index.append(torch.zeros(block - (end - start), dtype=torch.long))
            real.append(torch.ones(end - start, dtype=torch.bool))
            real.append(torch.zeros(block - (end - start), dtype=torch.bool))
            offset += length
        index.append(torch.zeros(self.tail_padding, dtype=torch.long))
        real.append(torch.zeros(self.tail_padding, dtype=torch.bool))
        return torch.cat(index), torch.cat(real)

    @cached_property
    def local_segment(self) -> torch.Tensor:
        """The segment of each local row (the tail padding counts as the last segment's)."""
        blocks = [self.block(s) for s in range(len(self.segments))]
        blocks[-1] += self.tail_padding
        return torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))

    @cached_property
    def local_index(self) -> torch.Tensor:
        """Single-process index of each local row (0 on padding rows, which attention leaves out)."""
        return self._rank_rows(self.rank)[0]

    @cached_property
    def local_real(self) -> torch.Tensor:
        return self._rank_rows(self.rank)[1]

    def rank_real(self, rank: int) -> torch.Tensor:
        """Which local rows of `rank` are real (False on its padding rows)."""
        return self._rank_rows(rank)[1]

    @cached_property
    def has_padding(self) -> bool:
        return self.world * self.local_len != self.num_tokens

    @cached_property
    def gathered_order(self) -> torch.Tensor | None:
        """Positions in the all-to-all output (rank-major local rows) listed in single-process order, padding
        rows last; None when that order is already the identity."""
        rows = [self._rank_rows(r) for r in range(self.world)]
        index = torch.cat([i for i, _ in rows])
        real = torch.cat([m for _, m in rows])
        real_positions = torch.nonzero(real).squeeze(1)
        order = torch.cat([real_positions[torch.argsort(index[real])], torch.nonzero(~real).squeeze(1)])
        return None if torch.equal(order, torch.arange(len(order))) else order

    def take_local(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's local rows of a full-sequence tensor, padding rows zeroed."""
        rows = full.index_select(dim, self.local_index.to(full.device))
        if not self.has_padding:
            return rows
        shape = [1] * full.dim()
        shape[dim] = -1
        return rows * self.local_real.to(full.device).view(shape).to(rows.dtype)

    def segment_rows(self, segment: int) -> torch.Tensor:
        """Local row positions that hold real rows of `segment` (to cut a segment out of a DiT output)."""
        start = sum(self.block(s) for s in range(segment))
        first, last = self.segment_range(segment)
        return torch.arange(start, start + last - first)


class Sharding(Protocol):
    """What a family denoiser asks of its process group (the one-process answers are `LocalSharding`)."""

    sp_size: int
    sp_rank: int

    def plan(self, segments: tuple[int, ...]) -> SequencePlan: ...

    def attention(self, plan: SequencePlan) -> AttentionBackend: ...

    def branches(self, names: list[str]) -> list[str]:
        """The CFG branches this process computes out of `names`."""
        ...

    def exchange(self, outputs: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """Every branch's output in `names` order, fetching those computed elsewhere."""
        ...

    def gather(self, local: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Concatenate along dim 1 the local rows of every sequence-parallel rank (`lengths[r]` rows each)."""
        ...

    def should_stop(self, local_decision: bool) -> bool:
        """One stop decision for the whole group (rank 0's)."""
        ...


class LocalSharding:
    sp_size = 1
    sp_rank = 0

    def plan(self, segments: tuple[int, ...]) -> SequencePlan:
        return SequencePlan(segments)

    def attention(self, plan: SequencePlan) -> AttentionBackend:
        return LOCAL_ATTENTION

    def branches(self, names: list[str]) -> list[str]:
        return names

    def exchange(self, outputs: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        return [outputs[name] for name in names]

    def gather(self, local: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return local

    def should_stop(self, local_decision: bool) -> bool:
        return local_decision


LOCAL = LocalSharding()
