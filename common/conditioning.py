"""Image-to-image, inpainting and ControlNet control settings: the pieces diffusers 0.42.1's pipelines add to
text-to-image, each a pure function of tensors and options, family-agnostic (the family supplies its latent
normalisation and token layout).

Read next to `pipelines/qwenimage/pipeline_qwenimage_{img2img,inpaint,controlnet}.py` and
`pipelines/z_image/pipeline_z_image_{img2img,inpaint}.py`:

* strength: `get_timesteps` keeps the last `N - int(max(N - min(N * strength, N), 0))` steps of the full
  schedule; the scheduler starts at that begin index, so the Euler step reads the trimmed sigmas unchanged.
* init latents: the VAE posterior is *sampled* with the request's generator (`retrieve_latents`, before the
  noise is drawn from the same generator), normalised per family, then `scale_noise`d at the first kept sigma:
  `sigma * noise + (1 - sigma) * latents`.
* inpainting: the mask is preprocessed by diffusers' own `VaeImageProcessor` (grayscale, resize, binarize at
  0.5; `padding_mask_crop` crops image and mask to the mask's padded bounding box, resized with "fill"),
  resized to the latent grid with nearest interpolation; after every Euler step the known region is put back:
  `(1 - m) * scale_noise(init, sigma_{i+1}, noise) + m * latents`, with the clean init latents after the last
  step. With `padding_mask_crop`, the decoded image is pasted back into the original (`apply_overlay`).
* ControlNet windows: `controlnet_keep[i] = 1 - (i / N < start or (i + 1) / N > end)`, the step's scale
  `conditioning_scale * keep` (Qwen-Image; the Z-Image ControlNet pipelines have no window).

Everything elementwise here works in any layout (grid or packed tokens, a rank's shard) as long as the
latents, noise, init latents and mask share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from imagegen.common.schedule import Schedule

PIXELS_PER_TOKEN = 16  # VAE scale 8 x patch 2: the processors' vae_scale_factor in both families


# ------------------------------------------------------------------------------------------------- strength
def strength_start(num_steps: int, strength: float) -> int:
    """`get_timesteps`' `t_start`: how many leading steps of the full schedule `strength` skips."""
    init_timestep = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_timestep, 0))


def trim_schedule(schedule: Schedule, strength: float) -> Schedule:
    """The steps img2img / inpainting run. Raises ValueError when none is left (diffusers does too)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = strength_start(schedule.num_steps, strength)
    if schedule.num_steps - start < 1:
        raise ValueError(f"strength {strength} leaves no denoising step of {schedule.num_steps}")
    return Schedule(schedule.sigmas[start:], schedule.timesteps[start:])


def scale_noise(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler.scale_noise` at one sigma (a 0-dim float32 entry of the schedule),
    computed in the latents' dtype as the scheduler casts its sigmas to it."""
    sigma = sigma.to(device=latents.device, dtype=latents.dtype)
    return sigma * noise + (1.0 - sigma) * latents


def noised_init(init_latents: torch.Tensor, noise: torch.Tensor, trimmed: Schedule) -> torch.Tensor:
    """The first latents of img2img / inpainting: the init latents noised at the first kept step."""
    return scale_noise(init_latents, noise, trimmed.sigmas[0])


# ----------------------------------------------------------------------------------------- VAE init latents
def init_generator(seed: int) -> torch.Generator:
    """The request's CPU generator: diffusers samples the VAE posterior from it, then draws the noise."""
    return torch.Generator("cpu").manual_seed(seed)


def sample_posterior(distribution, generator: torch.Generator) -> torch.Tensor:
    """`latent_dist.sample(generator)`: `mean + std * eps`, `eps` drawn on the CPU in the posterior's shape and
    dtype (what `randn_tensor` does for a CPU generator)."""
    eps = torch.randn(distribution.mean.shape, generator=generator, dtype=distribution.mean.dtype)
    return distribution.mean + distribution.std * eps.to(distribution.mean.device)


def normalise_qwen(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Qwen-Image `_encode_vae_image`: `(x - mean) * (1 / std)` per channel of `[B, z, T, h, w]` (the
    reciprocal is taken first, as diffusers does, so the bits match)."""
    shape = (1, len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean_t) * inv_std


def normalise_z_image(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Z-Image `prepare_latents`: `(x - shift_factor) * scaling_factor` (the inverse of its decode)."""
    return (latents - shift_factor) * scaling_factor


# ------------------------------------------------------------------------------------------------ inpainting
def image_processor() -> VaeImageProcessor:
    """The pipelines' init-image processor (resize to a multiple of 16, normalise to [-1, 1])."""
    return VaeImageProcessor(vae_scale_factor=PIXELS_PER_TOKEN)


def mask_processor() -> VaeImageProcessor:
    """The inpainting pipelines' mask processor: grayscale, no normalisation, binarized at 0.5."""
    return VaeImageProcessor(
        vae_scale_factor=PIXELS_PER_TOKEN, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )


@dataclass(frozen=True)
class InpaintInputs:
    """An inpainting request's preprocessed pixels: the init image `[1, 3, H, W]` in [-1, 1], the binary mask
    `[1, 1, H, W]` (1 = repaint), and the crop box when `padding_mask_crop` is set."""

    image: torch.Tensor
    mask: torch.Tensor
    crop: tuple[int, int, int, int] | None


def preprocess_inpaint(
    image: PIL.Image.Image,
    mask: PIL.Image.Image,
    width: int | None,
    height: int | None,
    padding_mask_crop: int | None = None,
) -> InpaintInputs:
    """As `QwenImageInpaintPipeline.__call__` steps 2 and 5 (`width`/`height` required there); Z-Image's inpaint
    pipeline has no crop and passes no size for the image (it keeps the image's own, rounded down to 16)."""
    crop = None
    resize_mode = "default"
    if padding_mask_crop is not None:
        if width is None or height is None:
            raise ValueError("padding_mask_crop needs the output width and height")
        crop = mask_processor().get_crop_region(mask, width, height, pad=padding_mask_crop)
        resize_mode = "fill"
    pixels = image_processor().preprocess(image, height=height, width=width, crops_coords=crop, resize_mode=resize_mode)
    pixels = pixels.to(torch.float32)
    height, width = pixels.shape[-2:]
    binary = mask_processor().preprocess(mask, height=height, width=width, resize_mode=resize_mode, crops_coords=crop)
    return InpaintInputs(pixels, binary, crop)


def latent_mask(mask: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The pixel mask `[B, 1, H, W]` on the latent grid `[B, 1, rows, cols]` (`interpolate`, nearest)."""
    return F.interpolate(mask, size=(rows, cols), mode="nearest").to(dtype)


def blend_known(
    latents: torch.Tensor,
    init_latents: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    trimmed: Schedule,
    step: int,
) -> torch.Tensor:
    """After Euler step `step` of the trimmed schedule: outside the mask, the init latents noised to the next
    sigma (clean after the last step); inside, the denoised latents."""
    known = init_latents
    if step < trimmed.num_steps - 1:
        known = scale_noise(init_latents, noise, trimmed.sigmas[step + 1])
    return (1 - mask) * known + mask * latents


def paste_back(
    mask: PIL.Image.Image, original: PIL.Image.Image, images: list[PIL.Image.Image], crop: tuple[int, int, int, int]
) -> list[PIL.Image.Image]:
    """`padding_mask_crop`'s last step: each generated crop pasted into the original image."""
    processor = image_processor()
    return [processor.apply_overlay(mask, original, image, crop) for image in images]


# --------------------------------------------------------------------------------------------------- control
@dataclass(frozen=True)
class ControlSettings:
    """One control of a request: its conditioning scale and the fraction of the schedule it acts in."""

    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control window must satisfy 0 <= start < end <= 1, got [{self.start}, {self.end}]")


def control_keep(num_steps: int, start: float, end: float) -> list[float]:
    """diffusers' `controlnet_keep` for one control: 1.0 on the steps inside the window, 0.0 outside."""
    return [1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


def control_scales(num_steps: int, controls: Sequence[ControlSettings]) -> list[list[float]]:
    """Per step, each control's effective scale `scale * keep` (0.0: the control is off at that step)."""
    keeps = [control_keep(num_steps, c.start, c.end) for c in controls]
    return [[c.scale * keep[i] for c, keep in zip(controls, keeps, strict=True)] for i in range(num_steps)]
