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

from imagegen.common.rope import Rotary, apply_rotary


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


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch SDPA on `[B, S, H, D]` tensors, laid out exactly as diffusers' native backend calls it."""
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=None, dropout_p=0.0
    )
    return out.permute(0, 2, 1, 3)


class AttentionBackend(Protocol):
    def joint(
        self, sharded: Heads | None, replicated: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attend over `replicated` and `sharded` tokens together; return each part's output `[B, S, H, D]`."""
        ...


def attend_in_order(
    sharded: Heads | None,
    replicated: Heads | None,
    replicated_first: bool,
    padding_rows: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One SDPA over `[replicated, sharded]` (or `[sharded, replicated]`), split back into the two parts.

    `padding_rows` (sequence-parallel fill after the sharded rows) never enter the SDPA, not even as masked
    keys: a mask or extra keys change the kernel's block tails and so the rounding of real rows (seen on CPU:
    ~1e-7 per attention, 1e-6 in an image). Their outputs are zeros appended to the sharded output.
    """
    parts = [p for p in ((replicated, sharded) if replicated_first else (sharded, replicated)) if p is not None]
    q, k, v = (torch.cat([getattr(p, name) for p in parts], dim=1) for name in ("q", "k", "v"))
    pieces = list(sdpa(q, k, v).split([len(p) for p in parts], dim=1))
    if sharded is None:
        return None, pieces[0]
    if replicated is None:
        sharded_out, replicated_out = pieces[0], None
    else:
        replicated_out, sharded_out = pieces if replicated_first else pieces[::-1]
    if padding_rows:
        sharded_out = F.pad(sharded_out, (0, 0, 0, 0, 0, padding_rows))
    return sharded_out, replicated_out


def joint_by_length(
    backend: AttentionBackend,
    sharded: Heads,
    replicated: Heads,
    replicated_first: bool,
    lengths: tuple[int, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`backend.joint` for a batch whose row b holds only its first `lengths[b]` replicated tokens (several
    requests' texts padded to the longest, `imagegen.common.batching`). Each run of consecutive rows of one
    length attends over exactly its own tokens, unmasked, so padding never reaches a real token's result; the
    padded rows' outputs are zero. Under sequence parallelism every rank has the same runs (the same batch)."""
    full = len(replicated)
    if lengths is None or all(n == full for n in lengths):
        return backend.joint(sharded, replicated, replicated_first)
    sharded_parts, replicated_parts = [], []
    start = 0
    while start < len(lengths):
        end, n = start, lengths[start]
        while end < len(lengths) and lengths[end] == n:
            end += 1
        rows = Heads(sharded.q[start:end], sharded.k[start:end], sharded.v[start:end])
        text = Heads(replicated.q[start:end, :n], replicated.k[start:end, :n], replicated.v[start:end, :n])
        sharded_out, text_out = backend.joint(rows, text, replicated_first)
        sharded_parts.append(sharded_out)
        replicated_parts.append(F.pad(text_out, (0, 0, 0, 0, 0, full - n)))
        start = end
    return torch.cat(sharded_parts), torch.cat(replicated_parts)


class LocalAttention:
    """Every token on this process: plain joint attention."""

    def joint(
        self, sharded: Heads | None, replicated: Heads | None, replicated_first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return attend_in_order(sharded, replicated, replicated_first)


LOCAL_ATTENTION = LocalAttention()


@dataclass(frozen=True)
class AttentionLayout:
    """What our attention processors need beyond the hidden states, for one forward.

    It travels through the diffusers blocks in the argument they reserve for rotary embeddings, which only our
    processors read. `num_replicated` trailing tokens of a single-stream sequence (Z-Image) are replicated;
    a dual-stream block (Qwen) gets its replicated text as a separate stream. `replicated_lengths` gives each
    batch row's real replicated tokens when a batch of requests pads texts of different lengths (None: all).
    """

    backend: AttentionBackend
    sharded_rotary: Rotary | None
    replicated_rotary: Rotary | None
    num_replicated: int = 0
    replicated_lengths: tuple[int, ...] | None = None
