"""Z-Image's VAE stage: final latents -> images (`decode`), as diffusers' `ZImagePipeline` calls
`AutoencoderKL`."""

from __future__ import annotations

import torch

from imagegen.common.checkpoint import ModelFolder
from imagegen.common.families.z_image import PATCH_MULTIPLE


# --------------------------------------------------------------------------------------------------------- vae
class ZImageVae:
    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self._setup(folder.load("vae", dtype, device))

    @classmethod
    def from_module(cls, vae: torch.nn.Module) -> ZImageVae:
        """Over an already-built VAE (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(vae)
        return stage

    def _setup(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.device = vae.device
        self.dtype = self.vae.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents `[K, 16, h, w]` -> images `[K, 3, H, W]` in [-1, 1] (before postprocessing)."""
        config = self.vae.config
        latents = latents.to(device=self.device, dtype=self.dtype)
        latents = latents / config.scaling_factor + config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]


def latent_shape(stage: ZImageVae, width: int, height: int) -> tuple[int, ...]:
    """One image's final latents as the denoiser hands them to the VAE: `[16, h, w]`."""
    scale = PATCH_MULTIPLE // 2
    return stage.vae.config.latent_channels, height // scale, width // scale
