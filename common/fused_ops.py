"""Candidate fused kernels for the fast path's non-matmul time (issue 21): `torch.library` custom ops, each with
a plain-PyTorch fallback that computes the unfused maths (what runs on the CPU: <= 1e-5 of it in float32).

* `norm_modulate` / `residual_norm_modulate` (and `_fp8` forms): optionally `x = x + gate * N_y(y)` first (the
  gated residual, with Z-Image's RMSNorm of the branch output), then LayerNorm (no affine) or RMSNorm (weight)
  of `x`, times `mul`, plus `add`: one pass over each row writing the next matmul's bf16 input, or its FP8 rows
  and per-row scales for `imagegen.common.fp8.linear_quantized`. Qwen: norm1 + modulation, and the attention
  residual + norm2 + modulation; Z-Image: attention_norm1 * scale, and the attention residual through
  attention_norm2 + ffn_norm1 * scale.
* `qk_norm_rope_joint` / `qk_norm_rope`: RMSNorm of every query and key head, then RoPE on interleaved pairs in
  float32, written straight into attention's joint `[B, sum n_i, H, D]` query / key / value (Qwen: image
  segment then text; no concatenation copies). Z-Image has one segment: only q and k are written, v stays a
  view of the projection.
* The gated residual alone (`x + gate * y`, item b of the issue) has no kernel here: the compiler already fuses
  it with the following norm, the kernels above take it as their first step, and on the FP8 path the gate
  folds into the matmul's per-channel scales (`fp8.linear(..., out_scale=gate)`).

Each Triton program holds whole rows in registers and moves them with contiguous, vectorisable accesses
(pairs are split and joined in registers); the dropped hand-written QK kernel of issue 8 loaded and stored each
pair's halves at stride 2, the likeliest reason it ran 3x slower than the compiler's fusion. Rounding: float32
inside a kernel, one rounding per output (as the compiler does), except where diffusers rounds between steps that
matter (the norm weight product, the stored residual).
Kernels run for CUDA tensors; with `TRITON_INTERPRET=1` they run on CPU tensors too (the CI test).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from imagegen.common.fp8 import FP8_DTYPE, FP8_MAX, pad_rows, quantize_rows
from imagegen.common.kernels import rotate_pairs

try:  # CUDA builds of torch ship Triton; a CPU-only install runs the fallbacks
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or INTERPRET)


# --------------------------------------------------------------------------------------- reference maths
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers' `RMSNorm.forward`: float32 statistics, the normalised value cast to a low-precision weight's
    dtype, then scaled."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    out = x * torch.rsqrt(variance + eps)
    if weight is None:
        return out.to(x.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        out = out.to(weight.dtype)
    return out * weight


def _norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor:
    return rms_norm(x, weight, eps) if rms else F.layer_norm(x, x.shape[-1:], eps=eps)


def _residual(x, y, gate, y_weight, y_eps):
    if y_weight is not None:
        y = rms_norm(y, y_weight, y_eps)
    return x + gate * y


def _modulated(x, mul, add, weight, eps, rms):
    out = _norm(x, weight, eps, rms) * mul
    return out if add is None else out + add


def _quantized(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(pad_rows(out.reshape(-1, out.shape[-1])))


def _padded(rows):
    return rows + (-rows) % 16


# ----------------------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _norm_mod_kernel(
        X, Y, G, YW, W, MUL, ADD, RES, OUT, SCALE,
        T, D,
        sxb, sxt, syb, syt, sgb, sgt, smb, smt, sab, sat,
        eps, y_eps,
        HAS_Y: tl.constexpr, Y_NORM: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_ADD: tl.constexpr,
        FP8_OUT: tl.constexpr, ROUND_W: tl.constexpr, GRID_ROUND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b = row // T
        t = row % T
        d = tl.arange(0, BLOCK)
        m = d < D
        x = tl.load(X + b * sxb + t * sxt + d, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(Y + b * syb + t * syt + d, mask=m, other=0.0).to(tl.float32)
            if Y_NORM:
                yw = tl.load(YW + d, mask=m, other=0.0).to(tl.float32)
                y = y * tl.rsqrt(tl.sum(y * y, axis=0) / D + y_eps)
                if ROUND_W:
                    y = (y.to(tl.bfloat16).to(tl.float32) * yw).to(tl.bfloat16).to(tl.float32)
                else:
                    y = y * yw
            g = tl.load(G + b * sgb + t * sgt + d, mask=m, other=0.0).to(tl.float32)
            stored = (x + g * y).to(RES.dtype.element_ty)
            tl.store(RES + row * D + d, stored, mask=m)
            x = stored.to(tl.float32)  # the norm reads the residual stream as it is stored
        if RMS:
            n = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            if HAS_W:
                w = tl.load(W + d, mask=m, other=0.0).to(tl.float32)
                if ROUND_W:
                    n = (n.to(tl.bfloat16).to(tl.float32) * w).to(tl.bfloat16).to(tl.float32)
                else:
                    n = n * w
        else:
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(m, x - mean, 0.0)
            n = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
        out = n * tl.load(MUL + b * smb + t * smt + d, mask=m, other=0.0).to(tl.float32)
        if HAS_ADD:
            out = out + tl.load(ADD + b * sab + t * sat + d, mask=m, other=0.0).to(tl.float32)
        if FP8_OUT:
            scale = tl.maximum(tl.max(tl.abs(out), axis=0), 1e-12) / 448.0
            q = tl.minimum(tl.maximum(out / scale, -448.0), 448.0)
            if GRID_ROUND:  # the interpreter's float32 -> e4m3 cast mis-rounds across binades: round first
                step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.abs(q))), -6.0) - 3.0)
                q = tl.floor(q / step + 0.5) * step
            tl.store(OUT + row * D + d, q.to(OUT.dtype.element_ty), mask=m)
            tl.store(SCALE + row, scale)
        else:
            tl.store(OUT + row * D + d, out.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _norm_rope_heads(src, w_ptr, dst, inner, mask, wmask, c, s, dd, eps,
                         D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
        x = tl.load(src + inner, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + dd, mask=wmask, other=0.0).to(tl.float32)
        if ROUND:  # diffusers' RMSNorm: cast to the bf16 weight's dtype, then a bf16 product
            y = (y.to(tl.bfloat16).to(tl.float32) * w).to(tl.bfloat16).to(tl.float32)
        else:
            y = y * w
        a, b = tl.split(tl.reshape(y, (BH, BD // 2, 2)))
        out = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BH, BD))
        tl.store(dst + inner, out.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_rope_kernel(
        SRC, ssb, sst, QO, KO, VO, osb, ost, row0, WQ, WK, COS, SIN, csb, cst, n, eps,
        H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, WRITE_V: tl.constexpr,
        ROUND: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // n
        t = pid % n
        hh = tl.arange(0, BH)[:, None]
        dd = tl.arange(0, BD)[None, :]
        mask = (hh < H) & (dd < D)
        wmask = dd < D
        inner = hh * D + dd
        half = tl.arange(0, BD // 2)
        hmask = half < D // 2
        c = tl.load(COS + b * csb + t * cst + half, mask=hmask, other=0.0)[None, :]
        s = tl.load(SIN + b * csb + t * cst + half, mask=hmask, other=0.0)[None, :]
        src = SRC + b * ssb + t * sst
        out = b * osb + (row0 + t) * ost
        _norm_rope_heads(src, WQ, QO + out, inner, mask, wmask, c, s, dd, eps, D, BH, BD, ROUND)
        _norm_rope_heads(src + H * D, WK, KO + out, inner, mask, wmask, c, s, dd, eps, D, BH, BD, ROUND)
        if WRITE_V:
            tl.store(VO + out + inner, tl.load(src + 2 * H * D + inner, mask=mask, other=0.0), mask=mask)


def _bcast(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """`t` broadcast to `like` `[B, T, D]`: the tensor and its (batch, token) strides (0 where broadcast)."""
    if t is None:
        return None, 0, 0
    e = t.expand_as(like)
    if e.stride(-1) != 1:
        e = e.contiguous()
    return e, e.stride(0), e.stride(1)


def _launch_norm(x, y, gate, y_weight, y_eps, mul, add, weight, eps, rms, fp8_out):
    """The norm kernel over `x` `[B, T, D]` -> (residual or None, out) or (residual or None, q, scale)."""
    batch, tokens, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = batch * tokens
    res = torch.empty(batch, tokens, dim, dtype=x.dtype, device=x.device) if y is not None else None
    if fp8_out:
        padded = _padded(rows)
        out = torch.empty(padded, dim, dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty(padded, 1, dtype=torch.float32, device=x.device)
        out[rows:].zero_()
        scale[rows:].fill_(1e-12 / FP8_MAX)
    else:
        out = torch.empty(batch, tokens, dim, dtype=x.dtype, device=x.device)
        scale = None
    y, syb, syt = _bcast(y, x)
    gate, sgb, sgt = _bcast(gate, x)
    mul, smb, smt = _bcast(mul, x)
    add, sab, sat = _bcast(add, x)
    dummy = x
    low = x.dtype == torch.bfloat16
    if rows:
        _norm_mod_kernel[(rows,)](
            x, y if y is not None else dummy, gate if gate is not None else dummy,
            y_weight if y_weight is not None else dummy, weight if weight is not None else dummy,
            mul, add if add is not None else dummy, res if res is not None else dummy, out,
            scale if scale is not None else dummy,
            tokens, dim, x.stride(0), x.stride(1), syb, syt, sgb, sgt, smb, smt, sab, sat, eps, y_eps,
            HAS_Y=y is not None, Y_NORM=y_weight is not None, RMS=rms, HAS_W=weight is not None,
            HAS_ADD=add is not None, FP8_OUT=fp8_out, ROUND_W=low, GRID_ROUND=INTERPRET,
            BLOCK=triton.next_power_of_2(dim),
            num_warps=8 if dim > 2048 else 4,
        )  # fmt: skip
    return (res, out) if not fp8_out else (res, out, scale)


# ----------------------------------------------------------------------------------- norm + modulation ops
@torch.library.custom_op("imagegen::norm_modulate", mutates_args=())
def norm_modulate(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor | None, eps: float, rms: bool
) -> torch.Tensor:
    """`N(x) * mul (+ add)` for `x` `[B, T, D]`; N = LayerNorm without affine (`rms` False) or RMSNorm with
    `weight`; `mul` / `add` broadcast to `x` (Qwen: `mul = 1 + scale`, `add = shift`)."""
    if use_triton(x):
        return _launch_norm(x, None, None, None, 0.0, mul, add, weight, eps, rms, False)[1]
    return _modulated(x, mul, add, weight, eps, rms)


@norm_modulate.register_fake
def _(x, mul, add, weight, eps, rms):
    return torch.empty_like(x)


@torch.library.custom_op("imagegen::residual_norm_modulate", mutates_args=())
def residual_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    y_weight: torch.Tensor | None,
    y_eps: float,
    mul: torch.Tensor,
    add: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`r = x + gate * N_y(y)`, `N(r) * mul (+ add)`); N_y = RMSNorm with `y_weight`, or none."""
    if use_triton(x):
        res, out = _launch_norm(x, y, gate, y_weight, y_eps, mul, add, weight, eps, rms, False)
        return res, out
    res = _residual(x, y, gate, y_weight, y_eps)
    return res, _modulated(res, mul, add, weight, eps, rms)


@residual_norm_modulate.register_fake
def _(x, y, gate, y_weight, y_eps, mul, add, weight, eps, rms):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("imagegen::norm_modulate_fp8", mutates_args=())
def norm_modulate_fp8(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_modulate`'s rows quantized for the next FP8 matmul: (`q` `[M16, D]`, `scale` `[M16, 1]`), M = B*T
    padded with zero rows to a multiple of 16."""
    if use_triton(x):
        _, q, scale = _launch_norm(x, None, None, None, 0.0, mul, add, weight, eps, rms, True)
        return q, scale
    return _quantized(_modulated(x, mul, add, weight, eps, rms))


def _fake_fp8(x):
    rows = _padded(x.shape[0] * x.shape[1])
    return x.new_empty(rows, x.shape[2], dtype=FP8_DTYPE), x.new_empty(rows, 1, dtype=torch.float32)


@norm_modulate_fp8.register_fake
def _(x, mul, add, weight, eps, rms):
    return _fake_fp8(x)


@torch.library.custom_op("imagegen::residual_norm_modulate_fp8", mutates_args=())
def residual_norm_modulate_fp8(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    y_weight: torch.Tensor | None,
    y_eps: float,
    mul: torch.Tensor,
    add: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`r`, `q`, `scale`): `residual_norm_modulate` with the modulated rows quantized as `norm_modulate_fp8`."""
    if use_triton(x):
        return _launch_norm(x, y, gate, y_weight, y_eps, mul, add, weight, eps, rms, True)
    res = _residual(x, y, gate, y_weight, y_eps)
    return (res, *_quantized(_modulated(res, mul, add, weight, eps, rms)))


@residual_norm_modulate_fp8.register_fake
def _(x, y, gate, y_weight, y_eps, mul, add, weight, eps, rms):
    return (torch.empty_like(x), *_fake_fp8(x))


# -------------------------------------------------------------------------------------- QK norm + RoPE ops
def _heads_reference(qkv, heads, wq, wk, cos, sin, eps):
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)
    return rotate_pairs(rms_norm(q, wq, eps), cos, sin), rotate_pairs(rms_norm(k, wk, eps), cos, sin), v


def _launch_rope(qkvs, weights, coss, sins, heads, eps, write_v):
    first = qkvs[0]
    batch = first.shape[0]
    dim = first.shape[-1] // (3 * heads)
    total = sum(t.shape[1] for t in qkvs)
    shape = (batch, total, heads, dim)
    q, k = (torch.empty(shape, dtype=first.dtype, device=first.device) for _ in range(2))
    v = torch.empty(shape, dtype=first.dtype, device=first.device) if write_v else q
    row0 = 0
    for i, qkv in enumerate(qkvs):
        n = qkv.shape[1]
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        cos, sin = coss[i].contiguous(), sins[i].contiguous()
        csb = cos.stride(0) if cos.dim() == 3 else 0
        if n:
            _qk_rope_kernel[(batch * n,)](
                qkv, qkv.stride(0), qkv.stride(1), q, k, v, q.stride(0), q.stride(1), row0,
                weights[2 * i], weights[2 * i + 1], cos, sin, csb, cos.stride(-2), n, eps,
                H=heads, D=dim, BH=triton.next_power_of_2(heads), BD=triton.next_power_of_2(dim),
                WRITE_V=write_v, ROUND=first.dtype == torch.bfloat16 and weights[2 * i].dtype == torch.bfloat16,
                num_warps=4,
            )  # fmt: skip
        row0 += n
    return q, k, v


@torch.library.custom_op("imagegen::qk_norm_rope_joint", mutates_args=())
def qk_norm_rope_joint(
    qkvs: list[torch.Tensor],
    weights: list[torch.Tensor],
    coss: list[torch.Tensor],
    sins: list[torch.Tensor],
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments `qkvs[i]` `[B, n_i, 3 H D]` (a fused QKV projection's output), RMSNorm weights
    `weights[2i]` (query) and `weights[2i + 1]` (key), rotations `coss[i]` / `sins[i]` float32 `[n_i, D/2]` or
    `[B, n_i, D/2]` -> the joint query, key and value `[B, sum n_i, H, D]`, segments in order."""
    if use_triton(qkvs[0]):
        return _launch_rope(qkvs, weights, coss, sins, heads, eps, True)
    parts = [
        _heads_reference(qkv, heads, weights[2 * i], weights[2 * i + 1], coss[i], sins[i], eps)
        for i, qkv in enumerate(qkvs)
    ]
    q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
    return q, k, v.contiguous()


@qk_norm_rope_joint.register_fake
def _(qkvs, weights, coss, sins, heads, eps):
    first = qkvs[0]
    total = sum(t.shape[1] for t in qkvs)
    shape = (first.shape[0], total, heads, first.shape[-1] // (3 * heads))
    return tuple(first.new_empty(shape) for _ in range(3))


@torch.library.custom_op("imagegen::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    qkv: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment (Z-Image): normalised, rotated query and key `[B, n, H, D]`; the value stays the caller's
    view `qkv.unflatten(-1, (3, H, D))[:, :, 2]`."""
    if use_triton(qkv):
        q, k, _ = _launch_rope([qkv], [weight_q, weight_k], [cos], [sin], heads, eps, False)
        return q, k
    q, k, _ = _heads_reference(qkv, heads, weight_q, weight_k, cos, sin, eps)
    return q.contiguous(), k.contiguous()


@qk_norm_rope.register_fake
def _(qkv, weight_q, weight_k, cos, sin, heads, eps):
    shape = (*qkv.shape[:2], heads, qkv.shape[-1] // (3 * heads))
    return qkv.new_empty(shape), qkv.new_empty(shape)
