"""The two kernel paths of the denoise stage, and the pieces of the fast one that both families share.

* `reference`: operation for operation what diffusers computes (bitwise equal on the same GPU); the default on
  the CPU, and the one to use for verification and bug reports.
* `fast`: the default on CUDA. The same maths, arranged for the card: each DiT block compiled
  (`torch.compile(fullgraph=True)`, image and text lengths dynamic so one compile serves every size and prompt),
  the attention kernel chosen per shape by measurement and called by its own op, never through SDPA's
  process-wide switches (each CFG row attends over its real tokens, unmasked), the query/key/value projections
  fused into one matmul, RoPE as real arithmetic that the compiler fuses with the QK norm, the MLP's GELU in the
  matmul epilogue (`imagegen.common.fused`), CFG branches batched into one forward, and every forward replayed
  as a CUDA graph cached by shape (`imagegen.common.graphs.GraphCache`). Rounding differs from the reference
  (the fast path's contract: PSNR >= 35 dB and per-step cosine >= 0.9999 against diffusers on the full-size GPU
  benchmarks, docs/benchmarks.md); what is computed does not. On the CPU in float32 it stays within 1e-5.

`--kernels` (`StageSettings.kernels`) picks the path; `--compile` says when to compile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from imagegen.common.errors import InvalidArgument
from imagegen.common.stage_settings import DEFAULT_CACHE_ROOT

KERNELS = ("fast", "reference")
COMPILE_MODES = ("auto", "on", "off")
# A debugging hook, not configuration: tests and bisecting trace without inductor's code generation.
COMPILE_BACKEND_ENV = "IMAGEGEN_COMPILE_BACKEND"  # inductor; `eager`/`aot_eager` trace only (tests, bisecting)
# A one-off run compiles only when the compiler's cache already holds this model's graphs and the job is long
# enough for the ~25% faster forwards to repay tracing (a few seconds even with a warm cache).
AUTO_COMPILE_MIN_FORWARDS = 40


def resolve_kernels(value: str | None, device: torch.device | str) -> str:
    """`value`, else `fast` on CUDA and `reference` elsewhere."""
    value = value or ("fast" if torch.device(device).type == "cuda" else "reference")
    if value not in KERNELS:
        raise InvalidArgument("kernels", f"must be one of {', '.join(KERNELS)}, got {value!r}")
    return value


def resolve_compile(value: str | None) -> str:
    value = value or "auto"
    if value not in COMPILE_MODES:
        raise InvalidArgument("compile", f"must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ compilation
def configure_compiler(cache_root: str | Path = DEFAULT_CACHE_ROOT) -> None:
    """One-time process configuration, at start-up before any stage runs (`imagegen serve`, `imagegen generate`,
    the GPU benchmarks): inductor's caches (FX graphs, Triton kernels, autotuning) under our cache folder unless
    the deployment chose a place, so that a restart on the same machine (or pod volume) compiles from cache.
    Inductor reads its folder only from the environment, hence this one write, before other threads start."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_root) / "inductor"))


def compiled(fn: Callable) -> Callable:
    """`fn` compiled whole (a graph break is an error). The dims that vary between requests (batch, image
    sequence, text length) are marked dynamic where they enter (`mark_dynamic`), so one graph serves every
    request size and each function keeps a few (one row and batched) within dynamo's default recompile limit.
    No `torch._dynamo.config` is changed: it is process-wide, and the choice belongs to these functions."""
    return torch.compile(fn, fullgraph=True, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))


def mark_dynamic(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Let one compiled graph serve every size of `dim` (a sequence length) instead of one graph per size."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def batch_dynamic(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """The batch dim (0) dynamic, plus `dims`: one compiled graph serves every batch of requests with two or
    more rows (torch specialises size 1, so a single row keeps a graph of its own)."""
    for dim in (0, *dims):
        mark_dynamic(tensor, dim)
    return tensor


class CompileMarker:
    """A file per (model config, dtype, torch version) saying that this machine's compiler cache holds the
    graphs, so a one-off CLI run knows whether compiling is cheap. Written after a compiled forward ran."""

    def __init__(self, transformer: torch.nn.Module, cache_root: str | Path = DEFAULT_CACHE_ROOT) -> None:
        identity = json.dumps(
            [type(transformer).__name__, dict(transformer.config), str(transformer.dtype), torch.__version__],
            sort_keys=True,
            default=str,
        )
        self.path = Path(cache_root) / "compiled" / hashlib.sha256(identity.encode()).hexdigest()[:24]

    def present(self) -> bool:
        return self.path.is_file()

    def write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("compiled\n")
        except OSError:  # a read-only home only costs the next run its compile shortcut
            pass


def should_compile(mode: str, forwards: int, marker: CompileMarker, device: torch.device) -> bool:
    if device.type != "cuda" and mode != "on":
        return False
    if mode != "auto":
        return mode == "on"
    return marker.present() and forwards >= AUTO_COMPILE_MIN_FORWARDS


# -------------------------------------------------------------------------------------------- fused weights
def fuse_linears(owner: torch.nn.Module, name: str, linears: list[torch.nn.Linear]) -> None:
    """Register `owner.<name>_weight` (and `_bias`, or None) as the row-wise concatenation of `linears`, and
    make each linear's parameters views into it: one matmul instead of several, and no second copy of the
    weights (the reference path keeps using the linears, whose values are unchanged). Idempotent."""
    if hasattr(owner, f"{name}_weight"):
        return
    for kind in ("weight", "bias"):
        params = [getattr(lin, kind) for lin in linears]
        if params[0] is None:
            owner.register_buffer(f"{name}_{kind}", None, persistent=False)
            continue
        with torch.no_grad():
            fused = torch.cat(params)
        owner.register_buffer(f"{name}_{kind}", fused, persistent=False)
        for param, rows in zip(params, fused.split([p.shape[0] for p in params]), strict=True):
            param.data = rows


class BlockStages:
    """A block's functions before and after attention, run as they are or compiled (once, on first use)."""

    def __init__(self, pre: Callable, post: Callable) -> None:
        self.raw = (pre, post)
        self._compiled: tuple[Callable, Callable] | None = None

    def __call__(self, compile: bool) -> tuple[Callable, Callable]:
        if not compile:
            return self.raw
        if self._compiled is None:
            self._compiled = (compiled(self.raw[0]), compiled(self.raw[1]))
        return self._compiled


# ------------------------------------------------------------------------------------------------------ RoPE
def rotary_tables(freqs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """complex64 rotations -> (cos, sin) float32 tables on `device`, for `rotate_pairs`."""
    return freqs.real.float().contiguous().to(device), freqs.imag.float().contiguous().to(device)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` `[B, S, H, D]` with interleaved pairs rotated by `cos + i sin` (`[S, D/2]` or `[B, S, D/2]`), in
    float32: the complex product `(a + ib)(c + is)` written out, which the compiler fuses with the QK norm."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------------- attention
# Each kernel is called through its own ATen op, with the arguments `F.scaled_dot_product_attention` passes it
# when that backend is selected (no mask, no dropout, not causal, no gradients: the same bits). Choosing one
# therefore needs no `torch.nn.attention.sdpa_kernel`, whose switches live in `at::globalContext()` for the whole
# process: under `serve all`, while the denoiser's thread held "cuDNN only" (every measurement and every call), the
# encoders' masked grouped-query attention and the VAE's attention on other threads found no kernel, or another
# one. Nothing here reads or writes those switches: a kernel SDPA itself would refuse (`can_use_*`) is skipped.
@dataclass(frozen=True)
class AttentionKernel:
    """One SDPA backend: `run(q, k, v)` on `[B, H, S, D]` tensors, `usable(q, k, v)` SDPA's own constraints."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    usable: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]


def _sdpa_allows(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]:
    """SDPA's own constraints for a CUDA backend (`torch.backends.cuda.can_use_<backend>_attention`), for
    attention without mask, dropout, causality or grouped-query heads."""

    def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        check = getattr(torch.backends.cuda, f"can_use_{backend}_attention")
        return check(torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False))

    return usable


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask): SDPA's values without grad
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # As SDPA: the head dim padded to a multiple of 8, the scale that of the unpadded dim, the output sliced back.
    dim = q.shape[-1]
    pad = -dim % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=1.0 / math.sqrt(dim))[0]
    return out[..., :dim] if pad else out


def _efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, False)[0]


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[0]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, False, None)[0]


def _always(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return True  # the op itself refuses what it cannot do (a RuntimeError while measuring: skipped)


CUDNN = AttentionKernel("CUDNN_ATTENTION", _cudnn, _sdpa_allows("cudnn"))
FLASH = AttentionKernel("FLASH_ATTENTION", _flash, _sdpa_allows("flash"))
EFFICIENT = AttentionKernel("EFFICIENT_ATTENTION", _efficient, _sdpa_allows("efficient"))
CPU_FLASH = AttentionKernel("FLASH_ATTENTION_CPU", _cpu_flash, _always)
MATH = AttentionKernel("MATH", _math, _always)  # the fallback where no candidate runs (SDPA's, too)
# Candidates per device type, fastest measured per shape. On the CPU the one SDPA itself picks for unmasked
# attention, so the fast path there stays equal to the reference; tests put more here to exercise the choice.
CANDIDATES: dict[str, tuple[AttentionKernel, ...]] = {"cuda": (CUDNN, FLASH, EFFICIENT), "cpu": (CPU_FLASH,)}
MEASURE_RUNS = 5
_choices: dict[tuple, AttentionKernel] = {}
_choices_lock = threading.Lock()


def attention_kernel(q: torch.Tensor, k: torch.Tensor) -> AttentionKernel:
    """The fastest kernel for this `[B, S, H, D]` shape on this device, measured once per shape. A shape first
    seen while a CUDA graph is being captured (nothing can be timed then) gets the first usable candidate for
    that call only, and is measured on its next call outside a capture."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    kernel = _choices.get(key)  # the common case, without the lock (one dict read is atomic)
    if kernel is not None:
        return kernel
    with _choices_lock:
        kernel = _choices.get(key)
        if kernel is not None:
            return kernel
        if _capturing(q):
            qs, ks = q.transpose(1, 2), k.transpose(1, 2)
            return next((c for c in CANDIDATES.get(q.device.type, ()) if c.usable(qs, ks, ks)), MATH)
        kernel = _choices[key] = _fastest(q, k)
        return kernel


def _capturing(q: torch.Tensor) -> bool:
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _fastest(q: torch.Tensor, k: torch.Tensor) -> AttentionKernel:
    """Time each usable candidate on random data of the shape (a few ms), calling the ops themselves; MATH if
    none runs."""
    qs = torch.randn_like(q).transpose(1, 2)
    ks = torch.randn_like(k).transpose(1, 2)
    vs = torch.randn_like(k).transpose(1, 2)
    usable = [kernel for kernel in CANDIDATES.get(q.device.type, ()) if kernel.usable(qs, ks, vs)]
    best, best_s = MATH, float("inf")
    for kernel in usable:
        try:
            if len(usable) == 1:  # nothing to compare: one call shows whether the op takes the shape
                kernel.run(qs, ks, vs)
                return kernel
            seconds = _time(kernel, qs, ks, vs)
        except RuntimeError:  # refused by the op itself (shape, dtype, card)
            continue
        if seconds < best_s:
            best, best_s = kernel, seconds
    return best


def _time(kernel: AttentionKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    for _ in range(2):
        kernel.run(q, k, v)
    if not q.is_cuda:
        start = time.perf_counter()
        for _ in range(MEASURE_RUNS):
            kernel.run(q, k, v)
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(MEASURE_RUNS):
        kernel.run(q, k, v)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def attention_choices() -> dict[str, str]:
    """The kernel measured for each shape so far (for logs and `bench/e2e_gpu.py`)."""
    with _choices_lock:
        return {f"q{list(k[0])} k{list(k[1])}": v.name for k, v in _choices.items()}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on `[B, S, H, D]` tensors with the measured kernel for the shape."""
    kernel = attention_kernel(q, k)
    return kernel.run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: tuple[int, ...]) -> list[torch.Tensor]:
    """Attention where batch row b uses only its first `valid[b]` tokens (the rest pads rows to a common
    length): one `[B, S, H, D]` output when every row is whole, else one `[1, valid[b], H, D]` per row. Each
    is an unmasked attention over real tokens, so no mask pushes SDPA onto a slower kernel; the padded rows'
    outputs are the caller's to fill."""
    total = q.shape[1]
    if all(n == total for n in valid):
        return [sdpa(q, k, v)]
    return [sdpa(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n]) for b, n in enumerate(valid)]


def join_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Inverse of `attention_rows`: its outputs as one `[B, length, H, D]` tensor, each row zero-filled after
    its real tokens (padded rows never reach a real one: they are never attended to)."""
    if len(rows) == 1:
        return rows[0]
    return torch.cat([F.pad(r, (0, 0, 0, 0, 0, length - r.shape[1])) for r in rows])


def pad_rows(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """`[L_i, D]` tensors -> `[N, length, D]`, zero rows after each one's own length."""
    return torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tensors])
