"""What each family's loaded stages accept: the numbers `imagegen.common.validation` checks requests against, read from
the loaded model (its config and RoPE tables), so a request a model cannot run is refused before it runs.

The numbers themselves come from each family package (`pipeline.input_limits`, `vae.latent_shape`, the edit
geometry); this module is where every service asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import PIL.Image

from imagegen.common.denoise import DenoiseJob
from imagegen.common.errors import Cancelled
from imagegen.common.families import Family
from imagegen.common.images import decode_image
from imagegen.common.options import Limits
from imagegen.common.validation import ModelInputs, check_image_blobs


def denoiser_inputs(family: Family, stage: object, job: DenoiseJob) -> ModelInputs:
    """Embedding width, text-token capacity next to this job's image grids, and condition channels (the
    family's `pipeline.input_limits`)."""
    return family.pipeline.input_limits(family.name, stage, job)


def latent_shape(family: Family, stage: object, width: int, height: int) -> tuple[int, ...]:
    """One image's final latents as the denoiser hands them to the VAE (without the batch axis)."""
    return family.module("vae").latent_shape(stage, width, height)


def check_edit_images(family: Family, sizes: Sequence[tuple[int, int]]) -> None:
    """Refuse input images whose aspect ratio makes the edit geometry round a side to nothing (the resize for
    the vision encoder or the VAE, or the default output size, would be 0 pixels wide)."""
    if family.takes_images and sizes:
        family.check_image_sizes(list(sizes))


def decode_inputs(
    images: Sequence[bytes], family: Family, limits: Limits, should_stop: Callable[[], bool] | None = None
) -> list[PIL.Image.Image]:
    """Edit images as every stage receives them (gateway, encoder, VAE): count and bytes, then each decoded
    (formats, pixel limit, EXIF orientation), then the geometry. `should_stop` is asked between images, so a
    caller who left stops the work."""
    check_image_blobs(images, family.defaults, family.name, limits)
    decoded = []
    for index, data in enumerate(images):
        if should_stop is not None and should_stop():
            raise Cancelled("the caller left while its images were decoded")
        decoded.append(decode_image(data, f"images[{index}]", limits.max_input_pixels))
    check_edit_images(family, [image.size for image in decoded])
    return decoded
