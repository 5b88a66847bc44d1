"""Tensors on the wire and in caches: safetensors bytes (never pickle), one named tensor per blob.

Every tensor crosses a process boundary through these two functions, so dtype and bits survive exactly.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from imagegen.common.errors import InvalidArgument

LATENTS = "latents"  # the tensor name of latents between the stages (denoiser output, VAE input, edit conditions)


def pack(tensor: torch.Tensor, name: str) -> bytes:
    """One CPU tensor -> the bytes of a safetensors file holding it under `name`."""
    return save({name: tensor.detach().to("cpu").contiguous()})


def unpack(data: bytes, name: str, field: str) -> torch.Tensor:
    """Bytes from `pack` -> the tensor. Malformed or foreign blobs raise `InvalidArgument(field)`."""
    if not data:
        raise InvalidArgument(field, "is empty")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(field, f"not a safetensors blob ({exc})") from exc
    if set(tensors) != {name}:
        raise InvalidArgument(field, f"expected one tensor named {name!r}, got {sorted(tensors)}")
    return tensors[name]
