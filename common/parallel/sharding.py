"""`Sharding` over a `ParallelGroup`: Ulysses (x ring) attention, CFG branches on their own ranks, gathers."""

from __future__ import annotations

import torch
import torch.distributed as dist

from imagegen.common.attention import LOCAL_ATTENTION, AttentionBackend
from imagegen.common.parallel.group import ParallelGroup
from imagegen.common.parallel.ring import RingShift
from imagegen.common.parallel.ulysses import UlyssesAttention
from imagegen.common.parallel.usp import UlyssesRingAttention
from imagegen.common.sharding import SequencePlan


class GroupSharding:
    def __init__(self, group: ParallelGroup) -> None:
        self.group = group
        self.sp_size = group.sp
        self.sp_rank = group.sp_rank
        self.ring_merge = group.ring_merge  # every rank's from the one GroupSpec

    def plan(self, segments: tuple[int, ...]) -> SequencePlan:
        return SequencePlan(segments, self.group.sp, self.group.sp_rank)

    def attention(self, plan: SequencePlan) -> AttentionBackend:
        group = self.group
        if group.sp == 1:
            return LOCAL_ATTENTION
        if group.layout.ring == 1:  # Ulysses alone keeps one process's key order exactly
            return UlyssesAttention(plan, group.sp_group, group.device)
        ring = RingShift(group.ring_ranks, group.ring_rank, group.ring_group)
        return UlyssesRingAttention(plan, group.layout, group.ulysses_group, ring, group.device, self.ring_merge)

    def _splits_branches(self, names: list[str]) -> bool:
        return self.group.cfg == 2 and len(names) == 2

    def branches(self, names: list[str]) -> list[str]:
        # With one branch to run (no CFG at this step), every CFG rank runs it: no exchange needed.
        return [names[self.group.cfg_rank]] if self._splits_branches(names) else names

    def exchange(self, outputs: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        if not self._splits_branches(names):
            return [outputs[name] for name in names]
        mine = outputs[names[self.group.cfg_rank]].contiguous()
        parts = [torch.empty_like(mine) for _ in names]
        dist.all_gather(parts, mine, group=self.group.cfg_group)  # group ranks are [s, s + P]: positive first
        return parts

    def gather(self, local: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.group.sp == 1:
            return local
        longest = max(lengths)
        padded = torch.zeros(local.shape[0], longest, *local.shape[2:], dtype=local.dtype, device=local.device)
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded, group=self.group.sp_group)
        return torch.cat([part[:, :length] for part, length in zip(parts, lengths, strict=True)], dim=1)

    def should_stop(self, local_decision: bool) -> bool:
        return self.group.broadcast_flag(local_decision)
