"""Initial noise and 2x2 latent patch packing.

Noise is drawn on the CPU from `torch.Generator("cpu").manual_seed(seed)` with the exact shape and dtype the
diffusers pipeline draws at (so the same seed gives the same image on every device and every GPU count), and
only then moved. Packing turns a latent `[B, C, H, W]` into raster-ordered 2x2 patch tokens; the families differ
only in the feature order inside a token (Qwen: channel slowest, Z-Image: channel fastest).
"""

from __future__ import annotations

import torch


def initial_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)`, on the CPU."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


def patchify(latents: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, (H/2)(W/2), 4C]` tokens in raster order.

    Within a token the features are ordered `(c, py, px)` when `channel_last` is False (Qwen) and
    `(py, px, c)` when it is True (Z-Image).
    """
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 3, 5, 1) if channel_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: torch.Tensor, height: int, width: int, channel_last: bool) -> torch.Tensor:
    """Inverse of `patchify` for a latent of `height` x `width`: `[B, S, 4C]` -> `[B, C, H, W]`."""
    b, _, features = tokens.shape
    c = features // 4
    if channel_last:
        x = tokens.view(b, height // 2, width // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4)
    else:
        x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)
