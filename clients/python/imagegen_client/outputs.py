"""Output images as bytes: PNG/JPEG/WEBP, or NPY holding the exact float32 array: the VAE service encodes, the
SDK decodes (one copy, here; the VAE service imports it from this package).

The uint8 conversion rounds exactly like diffusers' `VaeImageProcessor.numpy_to_pil` (`output_type="pil"`).
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image

# Proto enum names (imagegen.v1.OutputFormat without the prefix) -> PIL format; NPY has none.
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WEBP"}
FORMATS = (*IMAGE_FORMATS, "NPY")


def to_uint8(array: np.ndarray) -> np.ndarray:
    """float `[..., H, W, C]` in [0, 1] -> uint8, rounding as the pipelines' PIL output."""
    return (array * 255).round().astype("uint8")


def encode_array(array: np.ndarray, fmt: str) -> list[bytes]:
    """float32 `[K, H, W, C]` (C = 3 RGB, 4 RGBA) -> one encoded blob per image. NPY blobs are `.npy` files of
    `[H, W, C]` float32; JPEG cannot hold RGBA (ValueError: the services refuse it before any work)."""
    if fmt == "NPY":
        blobs = []
        for image in array:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
            blobs.append(buffer.getvalue())
        return blobs
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown output format {fmt!r} (known: {', '.join(FORMATS)})")
    if array.shape[-1] == 4 and fmt == "JPEG":
        raise ValueError("JPEG has no alpha channel for RGBA images: use PNG, WEBP or NPY")
    blobs = []
    for image in to_uint8(array):
        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format=IMAGE_FORMATS[fmt])
        blobs.append(buffer.getvalue())
    return blobs


def decode_output(data: bytes, fmt: str) -> np.ndarray:
    """One blob from `encode_array` -> float32 `[H, W, C]` in [0, 1] (exact for NPY, /255 for images); an image
    with alpha keeps its 4 channels."""
    if fmt == "NPY":
        return np.load(io.BytesIO(data), allow_pickle=False)
    with PIL.Image.open(io.BytesIO(data)) as image:
        mode = "RGBA" if "A" in image.getbands() else "RGB"
        return np.asarray(image.convert(mode), dtype=np.float32) / 255.0


def to_pil_images(array: np.ndarray) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(image) for image in to_uint8(array)]
