"""Qwen-Image-2.1's VAE stage: final latent tokens -> RGBA images (`decode`), as `QwenImage21Pipeline` calls
`AutoencoderKLQwenImage21`. Served for text-to-image only: no condition images are encoded."""

from __future__ import annotations

import torch

from imagegen.common.checkpoint import ModelFolder
from imagegen.common.errors import InvalidArgument
from imagegen.common.families.qwen_image_21 import NAME, latent_grid


# --------------------------------------------------------------------------------------------------------- vae
class Qwen21Vae:
    """Final latents `[K, h*w, 64]` -> RGBA images `[K, 4, H, W]` in [-1, 1] (before postprocessing)."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self._setup(folder.load("vae", dtype, device))

    @classmethod
    def from_module(cls, vae: torch.nn.Module) -> Qwen21Vae:
        """Over an already-built VAE (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(vae)
        return stage

    def _setup(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.device = vae.device
        self.dtype = vae.dtype
        config = vae.config
        self._mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        self._std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)

    def encode_condition(self, images: list) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        raise InvalidArgument("images", f"{NAME} is served for text-to-image only")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        rows, cols = latent_grid(width, height)
        # Channel-major memory whatever the caller's layout: the pipeline's latents are (the noise is drawn that
        # way and the Euler step keeps it), a gathered group result is not, and the VAE's convolutions round
        # differently on another memory layout.
        grid = latents.transpose(1, 2).contiguous().reshape(latents.shape[0], latents.shape[2], 1, rows, cols)
        grid = grid.to(device=self.device, dtype=self.dtype)
        grid = grid * self._std.to(grid.device, grid.dtype) + self._mean.to(grid.device, grid.dtype)
        return self.vae.decode(grid, return_dict=False)[0][:, :, 0]


def latent_shape(stage: Qwen21Vae, width: int, height: int) -> tuple[int, ...]:
    """One image's final latents as the denoiser hands them to the VAE: tokens `[h*w, 64]`."""
    rows, cols = latent_grid(width, height)
    return rows * cols, stage.vae.config.z_dim
