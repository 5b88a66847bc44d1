"""Fused kernels of the fast path, as `torch.library` custom ops with a plain-PyTorch twin.

* `linear_gelu_tanh`: `gelu_tanh(x W^T + b)` with the activation in cuBLASLt's epilogue (`_addmm_activation`),
  so the MLP's 4x-wide hidden state is written once instead of written, read and written again (the
  measurement is in docs/benchmarks.md). The compiler treats the op as an opaque call, so it cannot split it
  back into a matmul and a pointwise kernel.

(A hand-written Triton kernel for QK norm + RoPE was measured too, and was slower than the compiler's own
fusion of `imagegen.common.kernels.rotate_pairs` (docs/benchmarks.md), so the compiler's is what runs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("imagegen::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.gelu(F.linear(x, weight, bias), approximate="tanh")`; on CUDA with the GELU in the matmul epilogue."""
    if x.is_cuda:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
