"""The process group of a denoiser: P sequence-parallel ranks x C in {1, 2} CFG-parallel ranks.

Rank `c * P + s` computes CFG branch `c` (0 positive, 1 negative) on sequence shard `s`. The P ranks of a branch
split into a Ulysses degree U and a ring degree R = P / U (`SequenceParallelLayout`), each with its subgroups.
The same code runs on
gloo (CPU) and NCCL (GPU). Control messages (jobs, stop flags) always travel on a gloo group, so deciding to
stop never waits on the GPU stream. Every collective has a timeout, so a dead or hung rank fails the whole
group with an error instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from imagegen.common.errors import ImagegenError
from imagegen.common.parallel.layout import SequenceParallelLayout
from imagegen.common.stage_settings import COLLECTIVE_TIMEOUT_S

DEFAULT_TIMEOUT_S = COLLECTIVE_TIMEOUT_S


class GroupError(ImagegenError):
    """The process group cannot be formed or a peer failed."""


@dataclass
class ParallelGroup:
    rank: int
    world_size: int
    sp: int
    cfg: int
    device: torch.device
    sp_group: dist.ProcessGroup
    cfg_group: dist.ProcessGroup | None
    control_group: dist.ProcessGroup
    layout: SequenceParallelLayout = field(default_factory=SequenceParallelLayout)
    ulysses_group: dist.ProcessGroup | None = None  # None when U = 1 (no all-to-all)
    ring_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's ring, in ring order
    ring_group: dist.ProcessGroup | None = None  # None when R = 1 (no ring)
    ring_merge: str = "ordered"  # how ring attention merges its blocks (`GroupSpec.ring_merge`)

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    @property
    def ring_rank(self) -> int:
        return self.layout.ring_rank(self.sp_rank)

    @property
    def ulysses_rank(self) -> int:
        return self.layout.ulysses_rank(self.sp_rank)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(
        sp: int,
        cfg_parallel: bool,
        device: str | torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        layout: SequenceParallelLayout | None = None,
        ring_merge: str = "ordered",
    ) -> ParallelGroup:
        """Join the group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
        `layout` is U x R with U * R = sp; the default is Ulysses only (U = sp)."""
        layout = layout or SequenceParallelLayout(sp, 1)
        if layout.sp != sp:
            raise GroupError(f"layout {layout} is not --sp {sp}")
        cfg = 2 if cfg_parallel else 1
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world != sp * cfg:
            raise GroupError(f"world size {world} != sp {sp} x cfg {cfg}: start {sp * cfg} processes")
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        # Every rank must create every group, in the same order.
        sp_groups = [dist.new_group(list(range(c * sp, (c + 1) * sp)), timeout=timeout) for c in range(cfg)]
        cfg_groups = [dist.new_group([s, s + sp], timeout=timeout) for s in range(sp)] if cfg == 2 else []
        control = dist.new_group(list(range(world)), backend="gloo", timeout=timeout) if backend != "gloo" else None
        ulysses_group, ring_group, ring_ranks = _ulysses_and_ring_groups(layout, cfg, rank, timeout)
        if layout.ring == 1 and layout.ulysses > 1:
            ulysses_group = sp_groups[rank // sp]
        return ParallelGroup(
            rank=rank,
            world_size=world,
            sp=sp,
            cfg=cfg,
            device=device,
            sp_group=sp_groups[rank // sp],
            cfg_group=cfg_groups[rank % sp] if cfg_groups else None,
            control_group=control or dist.group.WORLD,
            layout=layout,
            ulysses_group=ulysses_group,
            ring_ranks=ring_ranks,
            ring_group=ring_group,
            ring_merge=ring_merge,
        )

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (length first, then the bytes), over the control group."""
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long)
        dist.broadcast(size, src=0, group=self.control_group)
        if size.item() == 0:
            return b""
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        if self.is_leader:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, src=0, group=self.control_group)
        return data.numpy().tobytes()

    def broadcast_flag(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.uint8)
        dist.broadcast(value, src=0, group=self.control_group)
        return bool(value.item())

    def close(self, peers_gone: bool = False) -> None:
        """Leave the group. `peers_gone`: the other ranks were killed, so an NCCL communicator is aborted
        rather than shut down (a shutdown could wait on them); gloo holds nothing that waits."""
        if not dist.is_initialized():
            return
        if peers_gone and self.device.type == "cuda":
            _abort_process_groups()
        else:
            dist.destroy_process_group()


def _ulysses_and_ring_groups(
    layout: SequenceParallelLayout, cfg: int, rank: int, timeout: timedelta
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None, list[int]]:
    """This rank's Ulysses subgroup and ring subgroup (with its members' global ranks in ring order). Every rank
    creates every subgroup of every CFG branch, in the same order, as `new_group` requires."""
    sp = layout.sp
    ulysses_group = ring_group = None
    ring_ranks: list[int] = []
    for c in range(cfg):
        if layout.ulysses > 1 and layout.ring > 1:  # with R = 1 the Ulysses group is the sp group
            for r in range(layout.ring):
                members = [c * sp + s for s in layout.ulysses_members(r)]
                made = dist.new_group(members, timeout=timeout)
                ulysses_group = made if rank in members else ulysses_group
        for u in range(layout.ulysses):
            members = [c * sp + s for s in layout.ring_members(u)]
            made = dist.new_group(members, timeout=timeout) if layout.ring > 1 else None
            if rank in members:
                ring_group, ring_ranks = made, members
    return ulysses_group, ring_group, ring_ranks


def _abort_process_groups() -> None:
    """Abort every process group of this process (NCCL communicators included) and forget them, so that a
    new group can form here. torch only offers this as a private API; without it, fall back to a destroy."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        dist.destroy_process_group()
        return
    abort()
