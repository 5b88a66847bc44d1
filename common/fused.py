"""Fused kernels of the fast path, each a `torch.library` custom op with a plain-PyTorch twin.

* `qk_norm_rope`: for every token of one or more segments (Qwen: image then text; Z-Image: one), RMS-norm the
  query and key heads, rotate them (float32 RoPE on interleaved pairs) and write query, key and value straight
  into the joint `[B, N, H, D]` tensors attention reads. One pass over the fused QKV output instead of the
  compiler's norm + rotary + concatenation kernels (the largest elementwise cost in the profile).
* `linear_gelu_tanh`: `gelu_tanh(x W^T + b)` with the activation in cuBLASLt's epilogue (`_addmm_activation`),
  so the MLP's 4x-wide hidden state is written once instead of written, read and written again.

The Triton kernel runs on CUDA when Triton is importable and passed a one-time check against the twin on
random data; otherwise (and always on the CPU) the twin runs. The compiler treats both ops as opaque calls.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from common.kernels import rotate_pairs

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the twins
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


# ---------------------------------------------------------------------------------------------- QK norm + RoPE
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' `RMSNorm.forward` with a low-precision weight: float32 statistics, cast, then scale."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def _twin(
    qkvs: list[torch.Tensor],
    weights: list[torch.Tensor],
    coss: list[torch.Tensor],
    sins: list[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i, qkv in enumerate(qkvs):
        q, k, v = qkv.unbind(2)
        wq, wk = weights[2 * i], weights[2 * i + 1]
        q = rotate_pairs(_rms_norm(q, wq, eps), coss[i], sins[i])
        k = rotate_pairs(_rms_norm(k, wk, eps), coss[i], sins[i])
        parts.append((q, k, v))
    return tuple(torch.cat([p[j] for p in parts], dim=1) for j in range(3))


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        src,
        s_batch,
        s_row,
        s_part,
        q_out,
        k_out,
        v_out,
        o_batch,
        o_row,
        row_offset,
        rows,
        w_q,
        w_k,
        cos,
        sin,
        t_batch,
        t_row,
        eps,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // rows
        r = pid % rows
        heads = tl.arange(0, BLOCK_H)[:, None]
        pairs = tl.arange(0, HALF)[None, :]
        mask = heads < HEADS
        dim = 2 * HALF
        inner = heads * dim + 2 * pairs
        base = src + b * s_batch + r * s_row
        out_offset = b * o_batch + (row_offset + r) * o_row + inner
        c = tl.load(cos + b * t_batch + r * t_row + pairs)
        s = tl.load(sin + b * t_batch + r * t_row + pairs)
        for part in tl.static_range(2):
            weight = w_q if part == 0 else w_k
            out = q_out if part == 0 else k_out
            xe = tl.load(base + part * s_part + inner, mask=mask, other=0.0).to(tl.float32)
            xo = tl.load(base + part * s_part + inner + 1, mask=mask, other=0.0).to(tl.float32)
            variance = (tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / dim
            scale = tl.rsqrt(variance + eps)[:, None]
            we = tl.load(weight + 2 * pairs).to(tl.float32)
            wo = tl.load(weight + 2 * pairs + 1).to(tl.float32)
            ye = ((xe * scale).to(tl.bfloat16).to(tl.float32) * we).to(tl.bfloat16).to(tl.float32)
            yo = ((xo * scale).to(tl.bfloat16).to(tl.float32) * wo).to(tl.bfloat16).to(tl.float32)
            tl.store(out + out_offset, (ye * c - yo * s).to(tl.bfloat16), mask=mask)
            tl.store(out + out_offset + 1, (ye * s + yo * c).to(tl.bfloat16), mask=mask)
        ve = tl.load(base + 2 * s_part + inner, mask=mask)
        vo = tl.load(base + 2 * s_part + inner + 1, mask=mask)
        tl.store(v_out + out_offset, ve, mask=mask)
        tl.store(v_out + out_offset + 1, vo, mask=mask)


def _triton_launch(qkvs, weights, coss, sins, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    first = qkvs[0]
    batch, _, _, heads, dim = first.shape
    total = sum(qkv.shape[1] for qkv in qkvs)
    q, k, v = (torch.empty(batch, total, heads, dim, dtype=first.dtype, device=first.device) for _ in range(3))
    offset = 0
    for i, qkv in enumerate(qkvs):
        rows = qkv.shape[1]
        if rows:
            cos, sin = coss[i], sins[i]
            t_batch = cos.stride(0) if cos.dim() == 3 else 0
            _qk_norm_rope_kernel[(batch * rows,)](
                qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
                q, k, v, q.stride(0), q.stride(1),
                offset, rows,
                weights[2 * i], weights[2 * i + 1],
                cos, sin, t_batch, cos.stride(-2),
                eps,
                HEADS=heads, HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads),
            )  # fmt: skip
        offset += rows
    return q, k, v


class _TritonGate:
    """Use the Triton kernel only after it matched the twin once on this process's GPU."""

    def __init__(self) -> None:
        self.ok: bool | None = None
        self.lock = threading.Lock()

    def usable(self, qkvs: list[torch.Tensor]) -> bool:
        first = qkvs[0]
        if triton is None or not first.is_cuda or first.dtype != torch.bfloat16 or first.shape[-1] % 2:
            return False
        if any(qkv.stride(-1) != 1 or qkv.stride(-2) != qkv.shape[-1] for qkv in qkvs):
            return False
        if self.ok is None and not torch.cuda.is_current_stream_capturing():
            with self.lock:
                if self.ok is None:
                    self.ok = self._self_check(first)
        return bool(self.ok)

    @staticmethod
    def _self_check(like: torch.Tensor) -> bool:
        heads, dim = like.shape[-2:]
        gen = torch.Generator(device=like.device).manual_seed(0)
        qkvs = [torch.randn(2, n, 3, heads, dim, device=like.device, generator=gen).bfloat16() for n in (37, 5)]
        weights = [torch.rand(dim, device=like.device, generator=gen).bfloat16() + 0.5 for _ in range(4)]
        angles = [torch.rand(n, dim // 2, device=like.device, generator=gen) * 6.3 for n in (37, 5)]
        coss, sins = [a.cos() for a in angles], [a.sin() for a in angles]
        try:
            fast = _triton_launch(qkvs, weights, coss, sins, 1e-6)
        except Exception as exc:  # noqa: BLE001 - any failure means: use the twin
            log.warning("fused QK-norm/RoPE kernel unavailable, using the PyTorch path: %s", exc)
            return False
        ref = _twin(qkvs, weights, coss, sins, 1e-6)
        pairs = zip(fast, ref, strict=True)
        worst = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in pairs)
        if worst > 2e-2:  # a wrong index gives ~1; bf16 roundings of the same maths ~3e-3
            log.warning("fused QK-norm/RoPE kernel disagrees with the PyTorch path (%.3g): using the latter", worst)
            return False
        return True


_gate = _TritonGate()


@torch.library.custom_op("imagegen::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    qkvs: list[torch.Tensor],
    weights: list[torch.Tensor],
    coss: list[torch.Tensor],
    sins: list[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments `qkvs[i]` `[B, n_i, 3, H, D]` (fused projection output), norm weights `weights[2i]` (query) and
    `weights[2i + 1]` (key), rotations `coss[i]`/`sins[i]` (`[n_i, D/2]` or `[B, n_i, D/2]`, float32) ->
    joint query, key, value `[B, sum n_i, H, D]`, segments in order."""
    if _gate.usable(qkvs):
        return _triton_launch(qkvs, weights, coss, sins, eps)
    return _twin(qkvs, weights, coss, sins, eps)


@qk_norm_rope.register_fake
def _(qkvs, weights, coss, sins, eps):
    first = qkvs[0]
    batch, _, _, heads, dim = first.shape
    total = sum(qkv.shape[1] for qkv in qkvs)
    return tuple(first.new_empty(batch, total, heads, dim) for _ in range(3))


# ------------------------------------------------------------------------------------------------ Linear + GELU
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
