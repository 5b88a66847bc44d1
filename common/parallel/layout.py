"""How a sequence-parallel group of P ranks splits into a Ulysses degree U and a ring degree R = P / U.

Ulysses scatters attention heads over U ranks (so U must divide the head count); ring attention passes key/value
blocks around R ranks that hold the same heads. Sequence-parallel rank `s` is Ulysses rank `s % U` of Ulysses
group `s // U` and ring rank `s // U` of ring group `s % U`: a Ulysses group is U consecutive ranks (on a GPU node,
neighbours on the fastest links, which the all-to-all needs most), and a ring joins the ranks with the same heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.common.errors import ImagegenError, InvalidArgument

TOKEN_PIXELS = 16  # both families: 8x VAE, then 2x2 latent patches per token


class LayoutError(ImagegenError):
    """No Ulysses x ring layout runs this request on this model."""


@dataclass(frozen=True)
class SequenceParallelLayout:
    ulysses: int = 1
    ring: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def ulysses_rank(self, sp_rank: int) -> int:
        return sp_rank % self.ulysses

    def ring_rank(self, sp_rank: int) -> int:
        return sp_rank // self.ulysses

    def ulysses_members(self, ring_rank: int) -> list[int]:
        """Sequence-parallel ranks of the Ulysses group at ring position `ring_rank`."""
        return [ring_rank * self.ulysses + u for u in range(self.ulysses)]

    def ring_members(self, ulysses_rank: int) -> list[int]:
        """Sequence-parallel ranks of the ring whose members hold Ulysses head slice `ulysses_rank`, in ring order."""
        return [r * self.ulysses + ulysses_rank for r in range(self.ring)]

    def __str__(self) -> str:
        return f"{self.ulysses}x{self.ring} (ulysses x ring)"


def valid_layouts(sp: int, num_heads: int) -> list[SequenceParallelLayout]:
    """Every U x R = sp with U dividing the head count, largest U first."""
    return [SequenceParallelLayout(u, sp // u) for u in range(sp, 0, -1) if sp % u == 0 and num_heads % u == 0]


def choose_layout(sp: int, num_heads: int, ulysses: int | None = None) -> SequenceParallelLayout:
    """The largest Ulysses degree that divides both P and the heads, or the `--ulysses` the operator asked for."""
    if sp < 1:
        raise LayoutError(f"--sp must be at least 1, got {sp}")
    layouts = valid_layouts(sp, num_heads)  # never empty: U = 1 always divides
    if ulysses is None:
        return layouts[0]
    for layout in layouts:
        if layout.ulysses == ulysses:
            return layout
    names = ", ".join(f"--ulysses {layout.ulysses}" for layout in layouts)
    raise LayoutError(
        f"--ulysses {ulysses} does not fit --sp {sp} on a model with {num_heads} attention heads "
        f"(U must divide both); valid for --sp {sp}: {names}"
    )


def image_tokens(width: int, height: int) -> int:
    return (width // TOKEN_PIXELS) * (height // TOKEN_PIXELS)


def check_request_fits(width: int, height: int, sp: int) -> None:
    """A request needs at least P image tokens (P ranges from 1 to the token count). Ranks past the last block of
    a segment that does not divide hold padding rows only, which attention leaves out as elsewhere."""
    tokens = image_tokens(width, height)
    if tokens < sp:
        raise InvalidArgument(
            "width",
            f"a {width}x{height} image has {tokens} image token(s) ({TOKEN_PIXELS}x{TOKEN_PIXELS} pixels each), "
            f"fewer than the {sp} sequence-parallel ranks of this denoiser; ask for at least {sp} tokens "
            f"(e.g. {TOKEN_PIXELS * sp}x{TOKEN_PIXELS}) or run it with --sp {max(1, tokens)} or less",
        )
