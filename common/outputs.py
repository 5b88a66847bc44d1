"""Output images as bytes (PNG/JPEG/WEBP, or NPY holding the exact float32 array). The VAE service encodes and
the SDK decodes with one copy of this code, in the client distribution: `imagegen_client.outputs`."""

from imagegen_client.outputs import (  # noqa: F401 (re-exported)
    FORMATS,
    IMAGE_FORMATS,
    decode_output,
    encode_array,
    to_pil_images,
    to_uint8,
)
