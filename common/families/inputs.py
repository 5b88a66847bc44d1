"""What each family's loaded stages accept: the numbers `imagegen.common.validation` checks requests against, read from
the loaded model (its config and RoPE tables), so a request a model cannot run is refused before it runs.

Kept beside the family modules (it knows their layouts) but apart from them: it only reads their stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import PIL.Image

from imagegen.common.denoise import DenoiseJob
from imagegen.common.errors import Cancelled, InvalidArgument
from imagegen.common.families import Family, qwen_image, z_image
from imagegen.common.images import decode_image
from imagegen.common.options import Limits
from imagegen.common.validation import ModelInputs, check_image_blobs

MIN_RESIZED_SIDE = 32  # the edit geometry rounds sides to multiples of 32: 0 means the image cannot be resized


def denoiser_inputs(family: Family, stage: object, job: DenoiseJob) -> ModelInputs:
    """Embedding width, text-token capacity next to this job's image grids, and condition channels."""
    transformer = stage.dit.transformer
    config = transformer.config
    if family.name == "z-image":
        # Caption RoPE ids are 1..Lp (Lp the length padded to 32) and the image frame id is Lp + 1, all on the
        # first axis of `axes_lens[0]` rows.
        multiple = z_image.SEQ_MULTI_OF
        return ModelInputs(config.cap_feat_dim, (config.axes_lens[0] - 2) // multiple * multiple, None)
    # Qwen: text RoPE rows continue after the largest half side of any image grid (the noisy one first).
    opts = job.options
    grids = [qwen_image.token_grid(opts.width, opts.height), *job.condition_shapes]
    start = max(max(rows // 2, cols // 2) for _, rows, cols in grids)
    table = transformer.pos_embed.pos_freqs.shape[0]
    if not family.takes_images:
        return ModelInputs(config.joint_attention_dim, table - start, None)
    # An edit image is resized to about `vae_area` pixels (sides rounded to 32): twice its tokens is a safe bound.
    tokens = 2 * qwen_image.VARIANTS[family.name].vae_area // qwen_image.PATCH_MULTIPLE**2
    return ModelInputs(config.joint_attention_dim, table - start, config.in_channels, tokens, table)


def latent_shape(family: Family, stage: object, width: int, height: int) -> tuple[int, ...]:
    """One image's final latents as the denoiser hands them to the VAE (without the batch axis)."""
    config = stage.vae.config
    if family.name == "z-image":
        scale = z_image.PATCH_MULTIPLE // 2
        return config.latent_channels, height // scale, width // scale
    grid = qwen_image.PATCH_MULTIPLE
    return (height // grid) * (width // grid), 4 * config.z_dim


def check_edit_images(family: Family, sizes: Sequence[tuple[int, int]]) -> None:
    """Refuse input images whose aspect ratio makes the edit geometry round a side to nothing (the resize for
    the vision encoder or the VAE, or the default output size, would be 0 pixels wide)."""
    if not family.takes_images or not sizes:
        return
    variant = qwen_image.VARIANTS[family.name]
    geometry = qwen_image.edit_geometry(variant, list(sizes))
    for index, (width, height) in enumerate(sizes):
        resized = (*geometry.vl_sizes[index], *geometry.vae_sizes[index])
        if min(resized) < MIN_RESIZED_SIDE:
            raise InvalidArgument(
                f"images[{index}]", f"a {width}x{height} image is too narrow or too flat for {family.name}"
            )
    if min(geometry.default_size) < 16:
        width, height = sizes[-1]
        raise InvalidArgument(
            f"images[{len(sizes) - 1}]", f"a {width}x{height} image is too narrow or too flat for {family.name}"
        )


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
