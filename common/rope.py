"""Rotary position embeddings, kept in float32 end to end.

Both model families rotate interleaved channel pairs `(x[2i], x[2i+1])` by a per-token angle: each pair is a
complex number multiplied by a unit complex frequency, exactly as the references do it (`view_as_complex` on
the float32 activations, complex64 tables), then cast back to the activation dtype. `Rotary` holds the table
rows of a sequence so that they can be sliced, gathered and concatenated with the same index maps as the
tokens they belong to (sequence parallelism shards both identically).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rotary:
    """complex64 rotations `[..., S, D/2]` (a leading batch dim is optional)."""

    freqs: torch.Tensor

    @staticmethod
    def from_complex(freqs: torch.Tensor) -> Rotary:
        return Rotary(freqs.to(torch.complex64).contiguous())

    def __len__(self) -> int:
        return self.freqs.shape[-2]

    def index(self, idx: torch.Tensor) -> Rotary:
        """Rows picked by `idx` along the sequence dim (used to shard a table with the tokens' own index map)."""
        return Rotary(self.freqs.index_select(-2, idx.to(self.freqs.device)))

    def to(self, device: torch.device | str) -> Rotary:
        return Rotary(self.freqs.to(device))


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate `x` of shape `[B, S, H, D]` by `rotary` (`[S, D/2]` or `[B, S, D/2]`), in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotary.freqs.unsqueeze(-2)).flatten(-2).to(x.dtype)
