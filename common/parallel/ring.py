"""Ring attention pieces: attention over one key/value block with its log-sum-exp, the fixed-order merge of such
partial results, and the point-to-point shift that passes key/value blocks around a ring.

Softmax attention over keys split into blocks K_1..K_n is exact from per-block results: with
`o_i = softmax(q K_i^T / sqrt(d)) V_i` and `l_i = logsumexp(q K_i^T / sqrt(d))`, the whole is
`sum_i exp(l_i - L) o_i` with `L = logsumexp_i l_i`. Float addition is not associative, so `merge_partials`
always adds the blocks in the order it is given (by source block, never by arrival), and every rank that merges
the same blocks gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Scores of one query chunk against one key block stay under this many float32 elements (bounded GPU memory).
MAX_SCORE_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class Partial:
    """Attention of some queries over one key block: `out` `[B, S, H, D]` and `lse` `[B, S, H]`, both float32."""

    out: torch.Tensor
    lse: torch.Tensor


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Partial:
    """Softmax attention of `q` over keys `k`/values `v` (`[B, S, H, D]`, no mask: callers pass real keys only),
    in float32, with the log-sum-exp of the scaled scores (scale 1/sqrt(D), as SDPA)."""
    b, s, h, d = q.shape
    qf, kf, vf = (t.float().permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, S, D]
    chunk = max(1, MAX_SCORE_ELEMENTS // max(1, b * h * k.shape[1]))
    outs, lses = [], []
    for start in range(0, s, chunk):
        scores = qf[:, :, start : start + chunk] @ kf.transpose(-1, -2) * d**-0.5
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ vf)
        lses.append(lse)
    return Partial(torch.cat(outs, dim=2).permute(0, 2, 1, 3), torch.cat(lses, dim=2).permute(0, 2, 1))


def merge_partials(partials: list[Partial]) -> torch.Tensor:
    """The attention over the union of the partials' key blocks (float32), summed in list order."""
    total = torch.logsumexp(torch.stack([p.lse for p in partials]), dim=0)
    out = None
    for p in partials:
        term = torch.exp(p.lse - total)[..., None] * p.out
        out = term if out is None else out + term
    return out


class RingShift:
    """Send a tensor to the next rank of the ring and receive the previous rank's, both at once (no deadlock
    whatever the ring size). Works on gloo and NCCL: `batch_isend_irecv` with global ranks."""

    def __init__(self, ring_ranks: list[int], ring_rank: int, group: dist.ProcessGroup) -> None:
        size = len(ring_ranks)
        self.next_rank = ring_ranks[(ring_rank + 1) % size]
        self.previous_rank = ring_ranks[(ring_rank - 1) % size]
        self.group = group

    def start(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Start passing `tensor` on; returns the buffer the previous rank's tensor arrives in and the requests."""
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next_rank, group=self.group),
            dist.P2POp(dist.irecv, received, self.previous_rank, group=self.group),
        ]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(received: torch.Tensor, requests: list) -> torch.Tensor:
        for request in requests:
            request.wait()
        return received
