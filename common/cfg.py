"""Classifier-free guidance rules of the two families, written once.

Both run unchanged on a sequence shard: Qwen's rule is per token, and Z-Image's global norm clip completes its
per-token sums through a gather that the sequence-parallel caller supplies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GatherTokens = Callable[[torch.Tensor], torch.Tensor]


def qwen_true_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image true CFG: `neg + s (pos - neg)`, then each token rescaled to the norm of `pos`.

    Norms are over the last (packed channel) dim and everything stays in the model dtype, as in diffusers.
    """
    combined = neg + scale * (pos - neg)
    cond_norm = torch.norm(pos, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def _all_tokens_here(x: torch.Tensor) -> torch.Tensor:
    return x


def z_image_cfg(
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: float,
    normalization: float,
    gather_tokens: GatherTokens = _all_tokens_here,
) -> torch.Tensor:
    """Z-Image CFG on float32 token predictions `[B, N, F]`: `pos + g (pos - neg)`, optionally clipped.

    With `normalization > 0` a sample whose guided norm exceeds `normalization * ||pos||` (norms over the whole
    sample) is scaled down to that bound; never up. The squares are summed per token first and the per-token
    sums then over all tokens; `gather_tokens` completes the `[B, n, 2]` per-token sums when the tokens are
    split over ranks, so the total is added in the same order for every split. The clip is a `where`, not a
    Python branch, so no host sync.
    """
    pred = pos + scale * (pos - neg)
    if not normalization or normalization <= 0:
        return pred
    per_token = torch.stack([pos.square().sum(-1), pred.square().sum(-1)], dim=-1)
    pos_norm, pred_norm = gather_tokens(per_token).sum(1).sqrt().unbind(-1)
    max_norm = pos_norm * float(normalization)
    factor = torch.where(pred_norm > max_norm, max_norm / pred_norm, torch.ones_like(pred_norm))
    return pred * factor.view(-1, 1, 1)
