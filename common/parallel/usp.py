"""Unified sequence parallelism: Ulysses over U ranks x ring attention over R ranks, replicated tokens kept out.

Per attention call on sequence-parallel rank s (Ulysses rank u, ring rank r), with local sharded heads
`[B, n, H, D]` and replicated heads `[B, L, H, D]`:
1. all-to-all the sharded part inside the Ulysses group: this rank gets the U local blocks of ranks
   r*U .. r*U+U-1 (rank-major, padding rows included) for its H/U heads (skipped when U = 1);
2. the stacked key/value blocks of the R ring ranks are exchanged, each kept by its source ring position, never
   by arrival: all-gathered over the ring group ("ordered") or passed on to the next ring rank step by step while
   this rank attends over the block it holds ("lse");
3. the replicated keys/values, sliced to this rank's heads, are used locally, once: they never enter the
   all-to-all nor the ring, so every replicated key counts exactly once, where one process has it (before the
   image tokens for Qwen, after them for Z-Image);
4. the attention itself, by `merge`:
   - "ordered" (default): the blocks' real rows are put in one process's key order (padding dropped) and one SDPA
     runs over [replicated, image] keys for this rank's queries, exactly as one process runs it for those rows:
     the result has one process's bits (as Ulysses alone has);
   - "lse": each block is attended as it arrives (padding keys dropped) and the partial results are merged by
     log-sum-exp in a fixed order (replicated, then source blocks 0..R-1; replicated last for Z-Image): the
     exchange overlaps the attention, and the result is one process's up to float rounding (on the CPU in fp32
     ~1e-6 on the images of the tiny test models, as far as an exact float64 attention is from one process);
5. all-to-all the image output back; all-gather the replicated output over the Ulysses heads. Every ring rank
   computes the replicated queries' output from the same blocks in the same order: the same bits everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from imagegen.common.attention import Heads, attend_in_order, sdpa
from imagegen.common.parallel.layout import SequenceParallelLayout
from imagegen.common.parallel.ring import Partial, RingShift, merge_partials, partial_attention
from imagegen.common.parallel.ulysses import gather_heads, scatter_heads
from imagegen.common.sharding import SequencePlan

MERGES = ("ordered", "lse")  # `--ring-merge` (GroupSpec.ring_merge)


class UlyssesRingAttention:
    """The attention backend of one rank of a U x R group for sequences laid out by `plan` (world = U * R)."""

    def __init__(
        self,
        plan: SequencePlan,
        layout: SequenceParallelLayout,
        ulysses_group: dist.ProcessGroup | None,
        ring: RingShift,
        device: torch.device,
        merge: str = "ordered",
    ) -> None:
        if merge not in MERGES:
            raise ValueError(f"ring merge {merge!r}: expected one of {', '.join(MERGES)}")
        self.plan = plan
        self.layout = layout
        self.ulysses_group = ulysses_group
        self.ring = ring
        self.merge = merge
        self.ulysses_rank = layout.ulysses_rank(plan.rank)
        self.ring_rank = layout.ring_rank(plan.rank)
        # The real rows of each ring position's block, as the all-to-all lays them out (rank-major, padding kept).
        self.real_rows = [
            torch.nonzero(torch.cat([plan.rank_real(s) for s in layout.ulysses_members(j)])).squeeze(1).to(device)
            for j in range(layout.ring)
        ]
        # The blocks of ring positions 0..R-1 side by side are every rank's local rows, rank-major: the layout
        # `gathered_order` is written for. Its first `num_tokens` entries are the real rows in one process's order.
        order = plan.gathered_order
        real_in_order = torch.arange(plan.num_tokens) if order is None else order[: plan.num_tokens]
        self.one_process_order = real_in_order.to(device)

    def _scatter(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.layout.ulysses == 1 else scatter_heads(t, self.layout.ulysses, self.ulysses_group)

    def _my_heads(self, heads: Heads) -> Heads:
        per_rank = heads.q.shape[2] // self.layout.ulysses
        lo, hi = self.ulysses_rank * per_rank, (self.ulysses_rank + 1) * per_rank
        return Heads(heads.q[:, :, lo:hi], heads.k[:, :, lo:hi], heads.v[:, :, lo:hi])

    def gather_blocks(self, keys_values: torch.Tensor) -> list[torch.Tensor]:
        """Every ring position's stacked `[2, B, rows, h, D]` key/value block, by position (one all-gather: a
        collective like the all-to-all, so CUDA graphs capture it the same way)."""
        blocks = [torch.empty_like(keys_values) for _ in range(self.layout.ring)]
        dist.all_gather(blocks, keys_values.contiguous(), group=self.ring.group)  # group ranks = ring positions
        return blocks

    def pass_blocks(self, keys_values: torch.Tensor, visit=None) -> list[torch.Tensor]:
        """Pass this rank's stacked `[2, B, rows, h, D]` key/value block around the ring; returns every ring
        position's block by position. `visit(source, block)` runs on each block while the next one travels."""
        blocks: list[torch.Tensor | None] = [None] * self.layout.ring
        current = keys_values.contiguous()
        for step in range(self.layout.ring):
            source = (self.ring_rank - step) % self.layout.ring
            pending = self.ring.start(current) if step < self.layout.ring - 1 else None
            blocks[source] = current
            if visit is not None:
                visit(source, current)
            if pending is not None:
                current = RingShift.finish(*pending)
        return blocks

    def _ordered(
        self, q: torch.Tensor, keys_values: torch.Tensor, mine: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        every_row = torch.cat(self.gather_blocks(keys_values), dim=2)
        k, v = (every_row[i].index_select(1, self.one_process_order) for i in (0, 1))
        if mine is None:
            return sdpa(q, k, v), None
        if replicated_first:
            out = sdpa(torch.cat([mine.q, q], 1), torch.cat([mine.k, k], 1), torch.cat([mine.v, v], 1))
            return out[:, len(mine) :], out[:, : len(mine)]
        out = sdpa(torch.cat([q, mine.q], 1), torch.cat([k, mine.k], 1), torch.cat([v, mine.v], 1))
        return out[:, : q.shape[1]], out[:, q.shape[1] :]

    def _log_sum_exp(
        self, q: torch.Tensor, keys_values: torch.Tensor, mine: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        queries = [q] if mine is None else [q, mine.q]
        partials: list[list[Partial | None]] = [[None] * self.layout.ring for _ in queries]

        def attend(source: int, block: torch.Tensor) -> None:
            rows = self.real_rows[source]
            if len(rows):  # a block of padding only adds nothing
                k, v = block[0].index_select(1, rows), block[1].index_select(1, rows)
                for i, query in enumerate(queries):
                    partials[i][source] = partial_attention(query, k, v)

        self.pass_blocks(keys_values, attend)
        outputs = []
        for query, by_source in zip(queries, partials, strict=True):
            ordered = [p for p in by_source if p is not None]
            if mine is not None:
                own = partial_attention(query, mine.k, mine.v)
                ordered = [own, *ordered] if replicated_first else [*ordered, own]
            outputs.append(merge_partials(ordered).to(q.dtype))
        return outputs[0], (outputs[1] if mine is not None else None)

    def joint(
        self, sharded: Heads | None, replicated: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if sharded is None:  # replicated tokens only (Z-Image's caption refiner): nothing to exchange
            return attend_in_order(None, replicated, replicated_first)
        q, k, v = (self._scatter(t) for t in (sharded.q, sharded.k, sharded.v))
        mine = None if replicated is None else self._my_heads(replicated)
        attend = self._ordered if self.merge == "ordered" else self._log_sum_exp
        sharded_out, replicated_out = attend(q, torch.stack([k, v]), mine, replicated_first)
        if self.layout.ulysses > 1:
            sharded_out = gather_heads(sharded_out.contiguous(), self.layout.ulysses, self.ulysses_group)
        if replicated_out is not None and self.layout.ulysses > 1:
            parts = [torch.empty_like(replicated_out) for _ in range(self.layout.ulysses)]
            dist.all_gather(parts, replicated_out.contiguous(), group=self.ulysses_group)
            replicated_out = torch.cat(parts, dim=2)
        return sharded_out, replicated_out
