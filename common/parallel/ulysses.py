"""Ulysses attention: an all-to-all over heads for the sharded tokens; replicated tokens never enter it.

Per attention call on rank r of P, with local sharded heads `[B, n, H, D]` and replicated heads `[B, L, H, D]`:
1. all-to-all the sharded part: every rank gets all P blocks for its H/P heads, `[B, P n, H/P, D]`;
2. put those rows back into single-process order, padding rows last (`SequencePlan.gathered_order`);
3. slice the replicated tokens to this rank's heads locally and place them where one process has them
   (before the image tokens for Qwen, after for Z-Image), so each appears exactly once;
4. attention over the real rows only (padding rows get zeros); undo the reordering; all-to-all back;
5. all-gather the replicated rows' outputs over heads, so they are whole and identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from imagegen.common.attention import Heads, attend_in_order
from imagegen.common.sharding import SequencePlan


def scatter_heads(x: torch.Tensor, world: int, group: dist.ProcessGroup) -> torch.Tensor:
    """`[B, n, H, D]` local rows, all heads -> `[B, world * n, H / world, D]` every rank's rows, our heads."""
    b, n, h, d = x.shape
    send = x.reshape(b, n, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def gather_heads(x: torch.Tensor, world: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `scatter_heads`: `[B, world * n, H / world, D]` -> `[B, n, H, D]`."""
    b, rows, heads, d = x.shape
    n = rows // world
    send = x.reshape(b, world, n, heads, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n, world * heads, d)


class UlyssesAttention:
    """The attention backend of one sequence-parallel rank for sequences laid out by `plan`."""

    def __init__(self, plan: SequencePlan, group: dist.ProcessGroup, device: torch.device) -> None:
        self.plan = plan
        self.group = group
        order = plan.gathered_order
        self.order = None if order is None else order.to(device)
        self.inverse = None if order is None else torch.argsort(order).to(device)

    def _my_heads(self, heads: Heads) -> Heads:
        per_rank = heads.q.shape[2] // self.plan.world
        lo, hi = self.plan.rank * per_rank, (self.plan.rank + 1) * per_rank
        return Heads(heads.q[:, :, lo:hi], heads.k[:, :, lo:hi], heads.v[:, :, lo:hi])

    def joint(
        self, sharded: Heads | None, replicated: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if sharded is None:  # replicated tokens only (Z-Image's caption refiner): nothing to exchange
            return attend_in_order(None, replicated, replicated_first)
        world = self.plan.world
        q, k, v = (scatter_heads(t, world, self.group) for t in (sharded.q, sharded.k, sharded.v))
        if self.order is not None:
            q, k, v = (t.index_select(1, self.order) for t in (q, k, v))
        gathered = Heads(q, k, v)
        real = self.plan.num_tokens
        padding_rows = len(gathered) - real
        mine = None if replicated is None else self._my_heads(replicated)
        sharded_out, replicated_out = attend_in_order(gathered.rows(0, real), mine, replicated_first, padding_rows)
        if self.inverse is not None:
            sharded_out = sharded_out.index_select(1, self.inverse)
        sharded_out = gather_heads(sharded_out, world, self.group)
        if replicated_out is not None:
            parts = [torch.empty_like(replicated_out) for _ in range(world)]
            dist.all_gather(parts, replicated_out.contiguous(), group=self.group)
            replicated_out = torch.cat(parts, dim=2)
        return sharded_out, replicated_out
