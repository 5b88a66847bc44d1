"""How the benchmarks and the parity tests compare two results: PSNR of images in [0, 1], cosine of tensors."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors, in float64."""
    a, b = a.double().flatten(), b.to(a.device).double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()
