"""Classifier-free guidance rules of the two families, written once.

Both functions are per token or reduce through `sum_over_tokens`, so they run unchanged on a sequence shard:
a sequence-parallel caller passes an all-reduce there to make the global norm of Z-Image's clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SumOverTokens = Callable[[torch.Tensor], torch.Tensor]


def qwen_true_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image true CFG: `neg + s (pos - neg)`, then each token rescaled to the norm of `pos`.

    Norms are over the last (packed channel) dim and everything stays in the model dtype, as in diffusers.
    """
    combined = neg + scale * (pos - neg)
    cond_norm = torch.norm(pos, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def _local_sum(x: torch.Tensor) -> torch.Tensor:
    return x


def z_image_cfg(
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: float,
    normalization: float,
    sum_over_tokens: SumOverTokens = _local_sum,
) -> torch.Tensor:
    """Z-Image CFG on float32 `[B, ...]` predictions: `pos + g (pos - neg)`, optionally clipped per sample.

    With `normalization > 0` a sample whose guided norm exceeds `normalization * ||pos||` (norms over the whole
    sample) is scaled down to that bound; never up. `sum_over_tokens` completes the per-sample sums of squares
    when the tokens are split over ranks. The clip is a `where`, not a Python branch, so no host sync.
    """
    pred = pos + scale * (pos - neg)
    if not normalization or normalization <= 0:
        return pred
    dims = tuple(range(1, pos.dim()))
    squares = sum_over_tokens(torch.stack([pos.square().sum(dims), pred.square().sum(dims)]))
    pos_norm, pred_norm = squares.sqrt()
    max_norm = pos_norm * float(normalization)
    factor = torch.where(pred_norm > max_norm, max_norm / pred_norm, torch.ones_like(pred_norm))
    return pred * factor.view(-1, *([1] * (pred.dim() - 1)))
