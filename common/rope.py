"""Rotary position embeddings, kept in float32 end to end.

Both model families rotate interleaved channel pairs `(x[2i], x[2i+1])` by a per-token angle. The reference
implementations multiply complex numbers; we hold the same table entries as separate cos/sin float32 tensors
(`Rotary`) because real arithmetic shards, concatenates and compiles more simply than complex tensors. The
rotation itself always runs in float32 and casts back to the activation dtype, as the references do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rotary:
    """cos/sin of the rotation angles, `[..., S, D/2]` float32 (a leading batch dim is optional)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def from_complex(freqs: torch.Tensor) -> Rotary:
        return Rotary(freqs.real.float().contiguous(), freqs.imag.float().contiguous())

    def __len__(self) -> int:
        return self.cos.shape[-2]

    def slice(self, start: int, end: int) -> Rotary:
        return Rotary(self.cos[..., start:end, :], self.sin[..., start:end, :])

    def index(self, idx: torch.Tensor) -> Rotary:
        """Rows picked by `idx` along the sequence dim (used to shard a table with the tokens' own index map)."""
        idx = idx.to(self.cos.device)
        return Rotary(self.cos.index_select(-2, idx), self.sin.index_select(-2, idx))

    def to(self, device: torch.device | str) -> Rotary:
        return Rotary(self.cos.to(device), self.sin.to(device))

    @staticmethod
    def cat(parts: list[Rotary]) -> Rotary:
        return Rotary(torch.cat([p.cos for p in parts], dim=-2), torch.cat([p.sin for p in parts], dim=-2))


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate `x` of shape `[B, S, H, D]` by `rotary` (`[S, D/2]` or `[B, S, D/2]`), in float32."""
    cos, sin = rotary.cos, rotary.sin
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
