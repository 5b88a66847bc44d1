"""The two kernel paths of the denoise stage, and the pieces of the fast one that both families share.

* `reference`: today's path, operation for operation what diffusers computes (bitwise equal on the same GPU);
  the default on the CPU, and the one to use for verification and bug reports.
* `fast`: the default on CUDA. The same maths, arranged for the card: each DiT block compiled
  (`torch.compile(fullgraph=True)`, text length dynamic so one compile serves every prompt), the attention
  kernel chosen per shape by measurement (each CFG row attends over its real tokens, unmasked), the
  query/key/value projections fused into one matmul, RoPE as real arithmetic that the compiler fuses with the
  QK norm, the MLP's GELU in the matmul epilogue (`imagegen.common.fused`), CFG branches batched into one forward, and
  every forward replayed as a CUDA graph cached by shape (`imagegen.common.graphs.GraphCache`). Rounding differs from
  the reference (on the full-size H200 benchmarks: PSNR 47-52 dB and per-step cosine >= 0.99988 against
  diffusers, docs/benchmarks.md); what is computed does not. On the CPU in float32 it stays within 1e-5.

`IMAGEGEN_KERNELS` (or `--kernels`) picks the path; `IMAGEGEN_COMPILE` (or `--compile`) says when to compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from imagegen.common.errors import InvalidArgument
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = ("fast", "reference")
KERNELS_ENV = "IMAGEGEN_KERNELS"
COMPILE_MODES = ("auto", "on", "off")
COMPILE_ENV = "IMAGEGEN_COMPILE"
COMPILE_BACKEND_ENV = "IMAGEGEN_COMPILE_BACKEND"  # inductor; `eager`/`aot_eager` trace only (tests, bisecting)
# A one-off run compiles only when the compiler's cache already holds this model's graphs and the job is long
# enough for the ~25% faster forwards to repay tracing (a few seconds even with a warm cache).
AUTO_COMPILE_MIN_FORWARDS = 40


def resolve_kernels(value: str | None, device: torch.device | str) -> str:
    """`value`, else `$IMAGEGEN_KERNELS`, else `fast` on CUDA and `reference` elsewhere."""
    value = value or os.environ.get(KERNELS_ENV) or ("fast" if torch.device(device).type == "cuda" else "reference")
    if value not in KERNELS:
        raise InvalidArgument("kernels", f"must be one of {', '.join(KERNELS)}, got {value!r}")
    return value


def resolve_compile(value: str | None) -> str:
    value = value or os.environ.get(COMPILE_ENV) or "auto"
    if value not in COMPILE_MODES:
        raise InvalidArgument("compile", f"must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ compilation
def cache_root() -> Path:
    return Path(os.environ.get("IMAGEGEN_CACHE") or Path.home() / ".cache" / "imagegen")


def use_persistent_compile_cache() -> None:
    """Keep inductor's caches (FX graphs, Triton kernels, autotuning) under our cache folder unless the
    deployment chose a place, so that a restart on the same machine (or pod volume) compiles from cache."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def compiled(fn: Callable) -> Callable:
    """`fn` compiled whole (a graph break is an error). Shapes are static (one graph per image size, the best
    kernels for it) except dims marked with `mark_dynamic`; a new shape compiles once on first use."""
    use_persistent_compile_cache()
    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(fn, fullgraph=True, dynamic=None, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))


def mark_dynamic(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Let one compiled graph serve every size of `dim` (the text length) instead of one graph per prompt."""
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

    def __init__(self, transformer: torch.nn.Module) -> None:
        identity = json.dumps(
            [type(transformer).__name__, dict(transformer.config), str(transformer.dtype), torch.__version__],
            sort_keys=True,
            default=str,
        )
        self.path = cache_root() / "compiled" / hashlib.sha256(identity.encode()).hexdigest()[:24]

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
_CANDIDATES = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
_choices: dict[tuple, SDPBackend | None] = {}
_choices_lock = threading.Lock()


def attention_backend(q: torch.Tensor, k: torch.Tensor) -> SDPBackend | None:
    """The fastest SDPA kernel for this shape on this card, measured once per shape (None: let SDPA choose)."""
    if q.device.type != "cuda":
        return None
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device.index)
    with _choices_lock:
        if key not in _choices:
            _choices[key] = None if torch.cuda.is_current_stream_capturing() else _fastest(q, k)
        return _choices[key]


def _fastest(q: torch.Tensor, k: torch.Tensor) -> SDPBackend | None:
    """Time each candidate on random data of the shape (a few ms); unsupported ones are skipped."""
    qs = torch.randn_like(q).transpose(1, 2)
    ks = torch.randn_like(k).transpose(1, 2)
    vs = torch.randn_like(k).transpose(1, 2)
    best, best_ms = None, float("inf")
    for backend in _CANDIDATES:
        try:
            with sdpa_kernel([backend]):
                for _ in range(2):
                    F.scaled_dot_product_attention(qs, ks, vs)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    F.scaled_dot_product_attention(qs, ks, vs)
                end.record()
                end.synchronize()
        except RuntimeError:
            continue
        ms = start.elapsed_time(end)
        if ms < best_ms:
            best, best_ms = backend, ms
    return best


def attention_choices() -> dict[str, str]:
    """The kernel measured for each shape so far (for logs and benchmarks)."""
    with _choices_lock:
        return {f"q{list(k[0])} k{list(k[1])}": (v.name if v is not None else "default") for k, v in _choices.items()}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on `[B, S, H, D]` tensors with the measured kernel for the shape."""
    backend = attention_backend(q, k)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if backend is None:
        out = F.scaled_dot_product_attention(*args)
    else:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*args)
    return out.transpose(1, 2)


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
