"""Qwen-Image's VAE stage: edit images -> packed condition latents (`encode_condition`), final packed latents
-> images (`decode`), as diffusers' Qwen-Image pipelines call `AutoencoderKLQwenImage`."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from imagegen.common.checkpoint import ModelFolder
from imagegen.common.families.qwen_image import PATCH_MULTIPLE, VARIANTS, edit_geometry, latent_grid, token_grid
from imagegen.common.latents import patchify, unpatchify

image_processor = VaeImageProcessor(vae_scale_factor=PATCH_MULTIPLE)


# --------------------------------------------------------------------------------------------------------- vae
class QwenVae:
    """Edit images -> packed condition latents; final packed latents -> images in [-1, 1]."""

    def __init__(self, folder: ModelFolder, dtype: torch.dtype, device: torch.device | str) -> None:
        self._setup(folder.load("vae", dtype, device), folder.family)

    @classmethod
    def from_module(cls, vae: torch.nn.Module, family: str) -> QwenVae:
        """Over an already-built VAE (benchmarks build full-size ones with random weights)."""
        stage = cls.__new__(cls)
        stage._setup(vae, family)
        return stage

    def _setup(self, vae: torch.nn.Module, family: str) -> None:
        self.variant = VARIANTS[family]
        self.vae = vae
        self.device = vae.device
        self.dtype = self.vae.dtype
        config = self.vae.config
        self._mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        self._std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)

    @torch.no_grad()
    def encode_condition(self, images: list[PIL.Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """Packed `[1, S_cond, 64]` latents of every image (concatenated) and their `img_shapes` entries."""
        sizes = edit_geometry(self.variant, [im.size for im in images]).vae_sizes
        packed, shapes = [], []
        for image, (width, height) in zip(images, sizes, strict=True):
            pixels = image_processor.preprocess(image, height, width).unsqueeze(2)
            pixels = pixels.to(device=self.device, dtype=self.dtype)
            latents = self.vae.encode(pixels).latent_dist.mode()
            mean = self._mean.to(latents.device, latents.dtype)
            std = self._std.to(latents.device, latents.dtype)
            latents = (latents - mean) / std
            packed.append(patchify(latents[:, :, 0], channel_last=False))
            shapes.append(token_grid(width, height))
        return torch.cat(packed, dim=1), shapes

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Packed `[K, S, 64]` -> images `[K, 3, H, W]` in [-1, 1] (before postprocessing)."""
        grid = unpatchify(latents, *latent_grid(width, height), channel_last=False)
        grid = grid.unsqueeze(2).to(device=self.device, dtype=self.dtype)
        # `grid / (1 / std)`, not `grid * std`: as diffusers writes it, for bitwise parity (it rounds otherwise).
        inv_std = 1.0 / self._std.to(grid.device, grid.dtype)
        grid = grid / inv_std + self._mean.to(grid.device, grid.dtype)
        return self.vae.decode(grid, return_dict=False)[0][:, :, 0]


def latent_shape(stage: QwenVae, width: int, height: int) -> tuple[int, ...]:
    """One image's final latents as the denoiser hands them to the VAE: packed `[S, 64]`."""
    return (height // PATCH_MULTIPLE) * (width // PATCH_MULTIPLE), 4 * stage.vae.config.z_dim
