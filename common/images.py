"""Image input and output: decoding user images safely, postprocessing, and writing files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.image_processor import VaeImageProcessor

from imagegen.common.errors import InvalidArgument

_postprocessor = VaeImageProcessor(vae_scale_factor=16)
OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def to_float_array(images: torch.Tensor) -> np.ndarray:
    """VAE output `[K, 3, H, W]` in [-1, 1] -> float32 `[K, H, W, 3]` in [0, 1], as `output_type="np"`."""
    return _postprocessor.postprocess(images, output_type="np")


def to_pil(array: np.ndarray) -> list[PIL.Image.Image]:
    """float `[K, H, W, 3]` in [0, 1] -> PIL images, rounding as the pipelines' `output_type="pil"`."""
    return VaeImageProcessor.numpy_to_pil(array)


INPUT_FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders we expose to callers' bytes (no TIFF, ICNS, FLI, ...)


DECODED_BYTES_PER_PIXEL = 4  # what a decoded pixel may take (RGBA/CMYK modes) before the RGB conversion


def _unreadable(field: str, exc: Exception) -> InvalidArgument:
    # A fixed reason, never the decoder's message: those name classes and heap addresses (`<_io.BytesIO ...>`).
    reason = "truncated" if isinstance(exc, EOFError | OSError) and "truncated" in str(exc) else "unreadable"
    if isinstance(exc, PIL.UnidentifiedImageError):
        reason = "not PNG, JPEG or WEBP"
    return InvalidArgument(field, f"not a readable image ({reason}; PNG, JPEG or WEBP)")


def image_size(data: bytes, field: str = "images") -> tuple[int, int]:
    """(width, height) from an image's header, without decoding it; INVALID_ARGUMENT for other formats."""
    try:
        with PIL.Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as probe:
            return probe.size
    except Exception as exc:
        raise _unreadable(field, exc) from exc


def check_decoded_bytes(images: list[bytes] | tuple[bytes, ...], max_bytes: int, field: str = "images") -> None:
    """Refuse, before decoding any, images whose decoded pixels together would exceed `max_bytes` (a few KB of
    all-zero PNG can claim gigabytes: the headers say how much, so nothing is decompressed to find out)."""
    total = 0
    for index, data in enumerate(images):
        width, height = image_size(data, f"{field}[{index}]")
        total += width * height * DECODED_BYTES_PER_PIXEL
        if total > max_bytes:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"the input images decode to more than {max_bytes} bytes together (width x height x "
                f"{DECODED_BYTES_PER_PIXEL} each); send fewer or smaller images",
            )


def decode_image(data: bytes, field: str = "images", max_pixels: int = 64 * 1024 * 1024) -> PIL.Image.Image:
    """Bytes of a PNG/JPEG/WEBP -> RGB PIL image as diffusers' `load_image` makes it (EXIF orientation applied,
    then RGB); refuses other formats, unreadable data and decompression bombs (size checked before decoding)."""
    try:
        with PIL.Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise InvalidArgument(field, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            probe.load()
            return PIL.ImageOps.exif_transpose(probe).convert("RGB")
    except (InvalidArgument, MemoryError):
        raise
    except Exception as exc:  # Pillow's decoders fail in many ways on hostile bytes; all are the caller's
        raise _unreadable(field, exc) from exc


def load_image_file(path: str | Path, field: str = "image") -> PIL.Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(field, f"no such file: {path}")
    return decode_image(path.read_bytes(), field)


def write_outputs(array: np.ndarray, output: str | Path) -> list[Path]:
    """Write `[K, H, W, 3]` (or RGBA `[K, H, W, 4]`) images: `.npy` holds the float32 array; image suffixes write
    one file per image (`{i}` in the name numbers them; without it, several images get `-i` before the suffix)."""
    output = Path(output)
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(output, array.astype(np.float32))
        return [output]
    if suffix not in OUTPUT_SUFFIXES:
        raise InvalidArgument("output", f"unsupported suffix {suffix!r}: use .png, .jpg, .webp or .npy")
    if array.shape[-1] == 4 and OUTPUT_SUFFIXES[suffix] == "JPEG":  # Qwen-Image-2.1 decodes RGBA
        raise InvalidArgument("output", "JPEG has no alpha channel for these RGBA images: use .png, .webp or .npy")
    paths = []
    for i, image in enumerate(to_pil(array)):
        if "{i}" in output.name:
            path = output.with_name(output.name.replace("{i}", str(i)))
        elif len(array) > 1:
            path = output.with_name(f"{output.stem}-{i}{output.suffix}")
        else:
            path = output
        image.save(path, format=OUTPUT_SUFFIXES[suffix])
        paths.append(path)
    return paths
