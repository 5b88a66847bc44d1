"""Joint attention over sharded and replicated tokens.

A DiT sequence has two kinds of tokens: image tokens, which a sequence-parallel group shards across ranks,
and conditioning tokens (Qwen's text stream, Z-Image's caption), which every rank holds whole. The family
forwards hand both kinds to an `AttentionBackend` separately, so a backend can move only the sharded tokens
through collectives while the replicated ones appear exactly once, at the position they have in one process
(Qwen: before the image tokens; Z-Image: after). `LocalAttention` is the one-process backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from common.rope import Rotary, apply_rotary


@dataclass(frozen=True)
class Heads:
    """Query, key and value, each `[B, S, H, D]`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def __len__(self) -> int:
        return self.q.shape[1]

    def rotated(self, rotary: Rotary) -> Heads:
        """Queries and keys rotated by `rotary` (float32 RoPE); values untouched."""
        return Heads(apply_rotary(self.q, rotary), apply_rotary(self.k, rotary), self.v)

    def rows(self, start: int, end: int | None = None) -> Heads:
        return Heads(self.q[:, start:end], self.k[:, start:end], self.v[:, start:end])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch SDPA on `[B, S, H, D]` tensors, laid out exactly as diffusers' native backend calls it."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, dropout_p=0.0
    )
    return out.permute(0, 2, 1, 3)


class AttentionBackend(Protocol):
    def joint(
        self,
        sharded: Heads | None,
        replicated: Heads | None,
        replicated_first: bool,
        sharded_key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attend over `replicated` and `sharded` tokens together; return each part's output `[B, S, H, D]`.

        `sharded_key_mask` (`[B, S_sharded]`, True = attend) hides padding among the sharded tokens.
        """
        ...


def _joint_key_mask(
    sharded: Heads | None, replicated: Heads | None, replicated_first: bool, sharded_key_mask: torch.Tensor | None
) -> torch.Tensor | None:
    if sharded_key_mask is None or replicated is None:
        return sharded_key_mask
    batch = sharded_key_mask.shape[0]
    ones = torch.ones(batch, len(replicated), dtype=torch.bool, device=sharded_key_mask.device)
    return torch.cat([ones, sharded_key_mask] if replicated_first else [sharded_key_mask, ones], dim=1)


def attend_in_order(
    sharded: Heads | None,
    replicated: Heads | None,
    replicated_first: bool,
    sharded_key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One SDPA over `[replicated, sharded]` (or `[sharded, replicated]`), split back into the two parts."""
    parts = [p for p in ((replicated, sharded) if replicated_first else (sharded, replicated)) if p is not None]
    if len(parts) == 1:
        out = sdpa(parts[0].q, parts[0].k, parts[0].v, sharded_key_mask if replicated is None else None)
        return (out, None) if replicated is None else (None, out)
    q, k, v = (torch.cat([getattr(p, name) for p in parts], dim=1) for name in ("q", "k", "v"))
    out = sdpa(q, k, v, _joint_key_mask(sharded, replicated, replicated_first, sharded_key_mask))
    first = len(parts[0])
    head, tail = out[:, :first], out[:, first:]
    return (tail, head) if replicated_first else (head, tail)


class LocalAttention:
    """Every token on this process: plain joint attention."""

    def joint(
        self,
        sharded: Heads | None,
        replicated: Heads | None,
        replicated_first: bool,
        sharded_key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return attend_in_order(sharded, replicated, replicated_first, sharded_key_mask)


LOCAL_ATTENTION = LocalAttention()


@dataclass(frozen=True)
class AttentionLayout:
    """What our attention processors need beyond the hidden states, for one forward.

    It travels through the diffusers blocks in the argument they reserve for rotary embeddings, which only our
    processors read. `num_replicated` trailing tokens of a single-stream sequence (Z-Image) are replicated;
    a dual-stream block (Qwen) gets its replicated text as a separate stream.
    """

    backend: AttentionBackend
    sharded_rotary: Rotary | None
    replicated_rotary: Rotary | None
    num_replicated: int = 0
    replicated_first: bool = False
    sharded_key_mask: torch.Tensor | None = None
