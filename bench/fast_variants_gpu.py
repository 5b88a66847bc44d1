"""Fast-path variants on one GPU (issue 21): which fused kernels, attention batching, compiler options and FP8
layer policies are worth integrating, measured in ONE device call on full-size random-weight DiTs.

    python bench/fast_variants_gpu.py [--budget-s 500] [--phases probes,qwen-1024,qwen-2048,z-image,inductor]
    python bench/fast_variants_gpu.py --smoke     # tiny checkpoints on the CPU, float32 (CI runs it)

What it measures, in this order (each phase checks the time budget first and records what it skipped):
* probes: row-wise FP8 `_scaled_mm` (bias in the epilogue, fast accumulation, M = 40 rejected / padded),
  every Triton kernel of `imagegen.common.fused_ops` against its fallback on bf16 data of the real shapes, and
  per-linear bf16 vs FP8 time at the DiT's matmul shapes (torchao's row-wise FP8 beside ours when importable);
* qwen-1024 (Qwen-Image 1024^2, true CFG batched B = 2, prompt lengths 27 / 5): per-stage times of block 0 for
  each pre-attention variant (inductor vs Triton norm + modulation; QK-norm + RoPE joined by `torch.cat`, by
  slice assignment into a preallocated joint buffer, with a swap-and-sign RoPE, or by the Triton kernel) and
  each post-attention variant; attention per CFG row vs one call (equal lengths); then whole forwards replayed
  as CUDA graphs: today's fast path, the best bf16 stages, equal prompt lengths, and FP8 under each layer
  policy (with the fused norm + quantize kernel, and with the gates folded into the FP8 scales);
* qwen-2048: today, best bf16, best FP8;
* z-image (Z-Image-Turbo 1024^2, B = 1): the same stage variants and FP8 policies for its single stream;
* inductor: the best bf16 Qwen stages compiled with `coordinate_descent_tuning` and with max-autotune (no
  cudagraphs), each set per compile through `torch.compile(options=...)`.
Every variant's one-forward output is compared with today's (cosine, SNR); FP8 variants also run an 8-step
Euler trajectory against today's (final-latent cosine and PSNR over the reference's range). A profiler table
(top kernels, time by kind) is taken of the best bf16 and the best FP8 forward of each workload. One JSON line
per record as it happens, the whole report in `$OUT/fast_variants.json`, a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.compare import cosine
from imagegen.common import fp8, fused_ops
from imagegen.common.cfg import qwen_true_cfg
from imagegen.common.fused import linear_gelu_tanh
from imagegen.common.kernels import (
    BlockStages,
    attention_rows,
    configure_compiler,
    join_rows,
    pad_rows,
    rotary_tables,
    rotate_pairs,
)
from imagegen.common.sharding import LOCAL

QWEN_LENGTHS = (27, 5)  # the e2e prompt's tiny-tokenizer length, and a short negative prompt
Z_CAPTION = 27


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ reporting
class Report:
    def __init__(self, out_dir: Path, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.path = out_dir / "fast_variants.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"records": [], "profiles": {}, "env": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.budget_s

    def add(self, **fields) -> dict:
        fields["at_s"] = round(self.elapsed(), 1)
        self.data["records"].append(fields)
        print(json.dumps(fields, default=str), flush=True)
        self.save()
        return fields

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def guarded(report: Report, kind: str, name: str, estimate_s: float, call: Callable[[], dict | None]) -> dict | None:
    """Run one measurement unless the budget is spent; a failure is recorded and the run goes on."""
    if not report.allows(estimate_s):
        report.add(kind=kind, name=name, skipped=f"budget ({report.elapsed():.0f} s of {report.budget_s:.0f} s)")
        return None
    try:
        result = call() or {}
        return report.add(kind=kind, name=name, **result)
    except Exception as exc:  # noqa: BLE001 - one failed variant must not cost the others
        error = f"{type(exc).__name__}: {exc}"[:1500]
        report.add(kind=kind, name=name, error=error, trace=traceback.format_exc()[-1500:])
        return None


def snr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / err)


def range_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR with the reference's value range as the peak (latents are not images in [0, 1])."""
    mse = (out.double() - ref.double()).pow(2).mean().item()
    peak = (ref.max() - ref.min()).double().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"cosine": cosine(out, ref), "snr_db": snr_db(out, ref), "finite": bool(torch.isfinite(out).all())}


# --------------------------------------------------------------------------------------------------- timing
def _clone(t: torch.Tensor) -> torch.Tensor:
    """A copy that keeps dynamo's dynamic-dim marks, so a stage timed alone reuses the forward's compiled graph."""
    copy = t.clone()
    for attr in ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices"):
        if hasattr(t, attr):
            setattr(copy, attr, set(getattr(t, attr)))
    return copy


class Captured:
    """`fn(*tensors)` on static inputs: a CUDA graph on the GPU (warm-up and compile off the capture stream),
    plain calls on the CPU. `run(*tensors)` copies new values in and returns the static output."""

    def __init__(self, fn: Callable, *tensors: torch.Tensor) -> None:
        self.fn = fn
        self.inputs = tuple(_clone(t) for t in tensors)
        self.graph = None
        if self.inputs[0].is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self.inputs)
                fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = fn(*self.inputs)
        else:
            self.output = fn(*self.inputs)

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, tensors, strict=False):
            static.copy_(value)
        if self.graph is None:
            self.output = self.fn(*self.inputs)
        else:
            self.graph.replay()
        return self.output

    def time_ms(self, replays: int) -> list[float]:
        times = []
        for _ in range(replays):
            if self.graph is None:
                start = time.perf_counter()
                self.output = self.fn(*self.inputs)
                times.append((time.perf_counter() - start) * 1e3)
                continue
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return times


def _flat(output) -> torch.Tensor:
    """A forward's or a stage's output as one float tensor, for the fidelity numbers (outside any timing)."""
    if isinstance(output, torch.Tensor):
        return output.detach().float().clone()
    return torch.cat([t.detach().float().flatten() for t in output if isinstance(t, torch.Tensor)])


def timed(fn: Callable, tensors: tuple, replays: int) -> tuple[dict, torch.Tensor, Captured]:
    """Capture (compiling on the way), then the median of `replays` timed replays; the output flattened."""
    start = time.perf_counter()
    captured = Captured(fn, *tensors)
    sync()
    setup_s = time.perf_counter() - start
    times = captured.time_ms(replays)
    result = {"ms": statistics.median(times), "ms_runs": [round(t, 3) for t in times], "setup_s": round(setup_s, 2)}
    return result, _flat(captured.output), captured


KINDS = (
    ("attention", ("fmha", "flash", "sdpa", "attention", "cudnn_generated")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "f8f8bf16", "scaled_mm", "cublas", "sm90_")),
    ("fused (ours)", ("_norm_mod_kernel", "_qk_rope_kernel")),
    ("inductor", ("triton_",)),
    ("copy", ("copy", "memcpy", "cat", "fill")),
)


def profile_table(fn: Callable, tensors: tuple, rows: int = 25) -> dict:
    """Kernel time of one call with no graph (compiled code stays): top kernels and time by kind."""
    from torch.profiler import ProfilerActivity, profile

    fn(*tensors)
    sync()
    activities = [ProfilerActivity.CUDA] if tensors[0].is_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn(*tensors)
        sync()
    events = []
    for evt in prof.key_averages():
        total = getattr(evt, "self_device_time_total", 0) if tensors[0].is_cuda else evt.self_cpu_time_total
        if total > 0:
            events.append((evt.key, total / 1e3, evt.count))
    events.sort(key=lambda e: -e[1])
    by_kind: dict[str, float] = {}
    for name, ms, _ in events:
        lower = name.lower()
        kind = next((k for k, keys in KINDS if any(key.lower() in lower for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    return {
        "total_ms": sum(e[1] for e in events),
        "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": n[:120], "ms": round(ms, 3), "calls": c} for n, ms, c in events[:rows]],
    }


# ---------------------------------------------------------------------------------------- recipe of a forward
@dataclass(frozen=True)
class Recipe:
    """One arrangement of the block stages; `None` in place of a recipe means today's `_block_pre/_post`."""

    pre_norm: str = "inductor"  # or "triton": the fused_ops norm + modulation kernel before attention
    qk: str = "cat"  # QK norm + RoPE into the joint layout: "cat" (today), "slice", "flip", "triton"
    post_norm: str = "inductor"  # or "triton": gated residual + norm + modulation kernel after attention
    fp8: bool = False  # quantized groups run FP8 (`fp8.has_fp8`), the others bf16
    fp8_norm: bool = False  # with a triton norm: the kernel writes the next matmul's FP8 rows itself
    fold_gates: bool = False  # FP8: gates folded into the output projections' per-channel scales

    @property
    def label(self) -> str:
        parts = [f"pre={self.pre_norm}", f"qk={self.qk}", f"post={self.post_norm}"]
        if self.fp8:
            parts.append("fp8" + ("+norm-quant" if self.fp8_norm else "") + ("+gates" if self.fold_gates else ""))
        return " ".join(parts)


def _lin(recipe: Recipe, owner, prefix: str, x, bf16: tuple, out_scale=None):
    """`x` times a group's weights: FP8 when the recipe and the group say so; `x` may be (q, s, rows, lead)."""
    if recipe.fp8 and fp8.has_fp8(owner, prefix):
        w, s, b = fp8.params(owner, prefix)
        if isinstance(x, tuple):
            q, sx, rows, lead = x
            return fp8.linear_quantized(q, sx, w, s, b, rows, lead, torch.bfloat16 if q.is_cuda else torch.float32,
                                        out_scale=out_scale)  # fmt: skip
        return fp8.linear(x, w, s, b, out_scale=out_scale)
    out = F.linear(x, *bf16)
    return out if out_scale is None else out * out_scale


def _quantizes(recipe: Recipe, norm: str, owner, prefix: str) -> bool:
    return recipe.fp8 and recipe.fp8_norm and norm == "triton" and fp8.has_fp8(owner, prefix)


def _foldable(recipe: Recipe, owner, prefix: str, gate: torch.Tensor) -> bool:
    return recipe.fp8 and recipe.fold_gates and fp8.has_fp8(owner, prefix) and gate.numel() == gate.shape[-1]


def _rotate_flip(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate_pairs` as `x * cos2 + swap_pairs(x) * (-sin, sin)`: no unbind / stack of the pairs."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    cos2 = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2).unsqueeze(-2)
    return (xf * cos2 + swapped * sin2).to(x.dtype)


# ---------------------------------------------------------------------------------------------- Qwen stages
def _qwen_mod(params: torch.Tensor, index):
    shift, scale, gate = params.chunk(3, dim=-1)
    if index is None:
        return shift[:, None], scale[:, None], gate[:, None]
    noisy = index[None, :, None] == 0
    return tuple(torch.where(noisy, p[0:1, None], p[1:2, None]) for p in (shift, scale, gate))


def _qwen_norm_in(recipe, kind, norm, x, shift, scale, consumer, prefix):
    """Norm + modulation of one stream feeding `consumer`'s matmul: bf16, or (q, s, rows, lead) for FP8."""
    if kind != "triton":
        return norm(x) * (1 + scale) + shift
    if _quantizes(recipe, kind, consumer, prefix):
        q, s = fused_ops.norm_modulate_fp8(x, 1 + scale, shift, None, norm.eps, False)
        return q, s, x.shape[0] * x.shape[1], x.shape[:-1]
    return fused_ops.norm_modulate(x, 1 + scale, shift, None, norm.eps, False)


def _qwen_qk(recipe, attn, img_qkv, txt_qkv, img_cos, img_sin, txt_cos, txt_sin):
    heads = attn.heads
    if recipe.qk == "triton":
        weights = [attn.norm_q.weight, attn.norm_k.weight, attn.norm_added_q.weight, attn.norm_added_k.weight]
        return fused_ops.qk_norm_rope_joint(
            [img_qkv, txt_qkv], weights, [img_cos, txt_cos], [img_sin, txt_sin], heads, attn.norm_q.eps
        )
    rotate = _rotate_flip if recipe.qk == "flip" else rotate_pairs
    iq, ik, iv = img_qkv.unflatten(-1, (3, heads, -1)).unbind(2)
    tq, tk, tv = txt_qkv.unflatten(-1, (3, heads, -1)).unbind(2)
    iq, ik = rotate(attn.norm_q(iq), img_cos, img_sin), rotate(attn.norm_k(ik), img_cos, img_sin)
    tq, tk = rotate(attn.norm_added_q(tq), txt_cos, txt_sin), rotate(attn.norm_added_k(tk), txt_cos, txt_sin)
    if recipe.qk != "slice":
        return tuple(torch.cat(pair, dim=1) for pair in ((iq, tq), (ik, tk), (iv, tv)))
    split = iq.shape[1]
    joint = []
    for img, txt in ((iq, tq), (ik, tk), (iv, tv)):
        buf = img.new_empty(img.shape[0], split + txt.shape[1], *img.shape[2:])
        buf[:, :split] = img
        buf[:, split:] = txt
        joint.append(buf)
    return tuple(joint)


def qwen_stages(recipe: Recipe) -> tuple[Callable, Callable]:
    """`_block_pre` / `_block_post` of `imagegen.common.families.qwen_image.dit_fast` under `recipe`."""

    def pre(block, hidden, text, img_mod1, txt_mod1, index, img_cos, img_sin, txt_cos, txt_sin):
        attn = block.attn
        i_shift, i_scale, img_gate1 = _qwen_mod(img_mod1, index)
        t_shift, t_scale, txt_gate1 = _qwen_mod(txt_mod1, None)
        img_x = _qwen_norm_in(recipe, recipe.pre_norm, block.img_norm1, hidden, i_shift, i_scale, attn, "img_qkv_")
        txt_x = _qwen_norm_in(recipe, recipe.pre_norm, block.txt_norm1, text, t_shift, t_scale, attn, "txt_qkv_")
        img_qkv = _lin(recipe, attn, "img_qkv_", img_x, (attn.img_qkv_weight, attn.img_qkv_bias))
        txt_qkv = _lin(recipe, attn, "txt_qkv_", txt_x, (attn.txt_qkv_weight, attn.txt_qkv_bias))
        q, k, v = _qwen_qk(recipe, attn, img_qkv, txt_qkv, img_cos, img_sin, txt_cos, txt_sin)
        return q, k, v, img_gate1, txt_gate1

    def stream(norm2, mlp, out_proj, x, attn_out, gate1, mod2, index):
        shift2, scale2, gate2 = _qwen_mod(mod2, index)
        first, last = mlp.net[0].proj, mlp.net[-1]
        fold1 = _foldable(recipe, out_proj, "", gate1)
        y = _lin(recipe, out_proj, "", attn_out, (out_proj.weight, out_proj.bias), gate1 if fold1 else None)
        if recipe.post_norm == "triton" and not fold1:
            if _quantizes(recipe, "triton", first, ""):
                x, q, s = fused_ops.residual_norm_modulate_fp8(x, y, gate1, None, 0.0, 1 + scale2, shift2, None,
                                                               norm2.eps, False)  # fmt: skip
                h_in = (q, s, x.shape[0] * x.shape[1], x.shape[:-1])
            else:
                x, h_in = fused_ops.residual_norm_modulate(x, y, gate1, None, 0.0, 1 + scale2, shift2, None,
                                                           norm2.eps, False)  # fmt: skip
        else:
            x = x + y if fold1 else x + gate1 * y
            h_in = _qwen_norm_in(recipe, recipe.post_norm, norm2, x, shift2, scale2, first, "")
        if recipe.fp8 and fp8.has_fp8(first, ""):
            h = F.gelu(_lin(recipe, first, "", h_in, (first.weight, first.bias)), approximate="tanh")
        else:
            h = linear_gelu_tanh(h_in, first.weight, first.bias)
        fold2 = _foldable(recipe, last, "", gate2)
        out = _lin(recipe, last, "", h, (last.weight, last.bias), gate2 if fold2 else None)
        return x + out if fold2 else x + gate2 * out

    def post(block, hidden, text, joint, img_gate1, txt_gate1, img_mod2, txt_mod2, index):
        attn = block.attn
        split = hidden.shape[1]
        img_attn, txt_attn = joint[:, :split].flatten(2, 3), joint[:, split:].flatten(2, 3)
        hidden = stream(block.img_norm2, block.img_mlp, attn.to_out[0], hidden, img_attn, img_gate1, img_mod2, index)
        text = stream(block.txt_norm2, block.txt_mlp, attn.to_add_out, text, txt_attn, txt_gate1, txt_mod2, None)
        return hidden, text

    return pre, post


# ------------------------------------------------------------------------------------------- Z-Image stages
def z_stages(recipe: Recipe) -> tuple[Callable, Callable]:
    """`_layer_pre` / `_layer_post` of `imagegen.common.families.z_image.dit_fast` under `recipe`."""

    def pre(layer, x, adaln, cos, sin):
        attn = layer.attention
        scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        norm1 = layer.attention_norm1
        if recipe.pre_norm != "triton":
            h = norm1(x) * (1.0 + scale_msa)
        elif _quantizes(recipe, "triton", attn, "qkv_"):
            q8, s8 = fused_ops.norm_modulate_fp8(x, 1.0 + scale_msa, None, norm1.weight, norm1.eps, True)
            h = (q8, s8, x.shape[0] * x.shape[1], x.shape[:-1])
        else:
            h = fused_ops.norm_modulate(x, 1.0 + scale_msa, None, norm1.weight, norm1.eps, True)
        qkv = _lin(recipe, attn, "qkv_", h, (attn.qkv_weight, None))
        if recipe.qk == "triton":
            q, k = fused_ops.qk_norm_rope(qkv, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.heads,
                                          attn.norm_q.eps)  # fmt: skip
            v = qkv.unflatten(-1, (3, attn.heads, -1))[:, :, 2]
        else:
            rotate = _rotate_flip if recipe.qk == "flip" else rotate_pairs
            q, k, v = qkv.unflatten(-1, (3, attn.heads, -1)).unbind(2)
            q, k = rotate(attn.norm_q(q), cos, sin), rotate(attn.norm_k(k), cos, sin)
        return q, k, v, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def post(layer, x, joint, gate_msa, scale_mlp, gate_mlp):
        to_out = layer.attention.to_out[0]
        ff = layer.feed_forward
        y = _lin(recipe, to_out, "", joint.flatten(2, 3), (to_out.weight, None))
        n2, f1 = layer.attention_norm2, layer.ffn_norm1
        if recipe.post_norm != "triton":
            x = x + gate_msa * n2(y)
            h = f1(x) * scale_mlp
        elif _quantizes(recipe, "triton", ff, "w13_"):
            x, q8, s8 = fused_ops.residual_norm_modulate_fp8(x, y, gate_msa, n2.weight, n2.eps, scale_mlp, None,
                                                             f1.weight, f1.eps, True)  # fmt: skip
            h = (q8, s8, x.shape[0] * x.shape[1], x.shape[:-1])
        else:
            x, h = fused_ops.residual_norm_modulate(x, y, gate_msa, n2.weight, n2.eps, scale_mlp, None, f1.weight,
                                                    f1.eps, True)  # fmt: skip
        gate, up = _lin(recipe, ff, "w13_", h, (ff.w13_weight, None)).chunk(2, dim=-1)
        return x + gate_mlp * layer.ffn_norm2(_lin(recipe, ff.w2, "", F.silu(gate) * up, (ff.w2.weight, None)))

    return pre, post


class OptionStages(BlockStages):
    """`BlockStages` compiled with per-compile inductor `options` (never the global config)."""

    def __init__(self, pre: Callable, post: Callable, options: dict | None) -> None:
        super().__init__(pre, post)
        self.options = options

    def __call__(self, compile: bool) -> tuple[Callable, Callable]:
        if not compile or not self.options:
            return super().__call__(compile)
        if self._compiled is None:
            wrap = [torch.compile(fn, fullgraph=True, dynamic=None, options=self.options) for fn in self.raw]
            self._compiled = (wrap[0], wrap[1])
        return self._compiled


# ------------------------------------------------------------------------------------------------ workloads
@dataclass
class Workload:
    """One DiT at one size: its fast forward, graph inputs, and how to swap the stages."""

    name: str
    family: str
    fast: object  # QwenFastDiT or ZImageFastDiT
    default_stages: BlockStages
    make_stages: Callable[[Recipe], tuple[Callable, Callable]]
    forward: Callable[..., Callable]  # (lengths) -> fn(*tensors)
    tensors: Callable[[int], tuple]  # step -> the forward's graph inputs at that step
    lengths: tuple[int, ...]
    steps: int
    compile: bool
    update: Callable  # (latent rows, output, sigma, sigma_next) -> next latent rows
    latents: torch.Tensor
    sigmas: list[float]

    def use(self, recipe: Recipe | None, options: dict | None = None) -> None:
        if recipe is None and not options:
            self.fast.stages = self.default_stages
        else:
            pre, post = self.default_stages.raw if recipe is None else self.make_stages(recipe)
            self.fast.stages = OptionStages(pre, post, options)


def qwen_workload(tr, size: int, lengths: tuple[int, ...], device, dtype, compile: bool, steps: int,
                  suffix: str = "") -> Workload:  # fmt: skip
    from imagegen.common.families.qwen_image import token_grid
    from imagegen.common.families.qwen_image.dit import qwen_rotary
    from imagegen.common.families.qwen_image.dit_fast import QwenFastDiT, QwenFastInputs

    fast = QwenFastDiT(tr)
    gen = torch.Generator().manual_seed(7)
    grid = token_grid(size, size)
    seq = grid[1] * grid[2]
    longest = max(lengths)
    embeds = [torch.randn(n, tr.config.joint_attention_dim, generator=gen) for n in lengths]
    image_rotary, text_rotary = qwen_rotary(tr, [grid], longest)
    rows = len(lengths)
    inputs = QwenFastInputs(
        pad_rows([e.to(device, dtype) for e in embeds], longest),
        torch.zeros(rows, 0, tr.config.in_channels, dtype=dtype, device=device),
        *rotary_tables(image_rotary.freqs, device),
        *rotary_tables(text_rotary.freqs, device),
        torch.zeros(seq, dtype=torch.int32, device=device),
    )
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    timesteps = (torch.tensor(sigmas[:-1]) * 1000).to(device, dtype) / 1000
    img_mods, txt_mods = fast.modulations(timesteps)
    latents = torch.randn(1, seq, tr.config.in_channels, generator=gen).to(device, dtype)

    def forward(lens):
        def run(latents, timestep, img_mod, txt_mod, *tensors):
            return fast(latents, timestep, img_mod, txt_mod, QwenFastInputs(*tensors), lens, compile)

        return run

    def tensors(step: int, lat: torch.Tensor | None = None) -> tuple:
        lat = latents if lat is None else lat
        return (lat.repeat(rows, 1, 1), timesteps[step : step + 1], img_mods[step], txt_mods[step], *inputs.tensors())

    def update(lat, out, sigma, sigma_next):
        velocity = qwen_true_cfg(out[:1], out[1:2], 4.0) if out.shape[0] > 1 else out[:1]
        return (lat.float() + (sigma_next - sigma) * velocity.float()).to(lat.dtype)

    name = f"qwen-image-{size}{suffix}"
    return Workload(name, "qwen-image", fast, fast.stages, qwen_stages, forward, tensors, lengths, steps, compile,
                    update, latents, sigmas)  # fmt: skip


def z_workload(tr, size: int, caption_len: int, device, dtype, compile: bool, steps: int) -> Workload:
    from imagegen.common.families.z_image import padded_length
    from imagegen.common.families.z_image.dit import ImageSlots, ZImageDiT
    from imagegen.common.families.z_image.dit_fast import ZImageFastDiT, ZImageFastInputs

    dit = ZImageDiT(tr)
    fast = ZImageFastDiT(tr)
    gen = torch.Generator().manual_seed(7)
    rows_, cols = size // 16, size // 16
    n = rows_ * cols
    slots = ImageSlots(LOCAL.plan((padded_length(n),)), n, device)
    caption = torch.randn(caption_len, tr.config.cap_feat_dim, generator=gen).to(device, dtype)
    with torch.no_grad():
        branch = dit.branch(caption, rows_, cols, slots)
    cap_cos, cap_sin = rotary_tables(branch.caption_rotary.freqs, device)
    img_cos, img_sin = (t[None] for t in rotary_tables(branch.image_rotary.freqs, device))
    inputs = ZImageFastInputs(
        branch.caption_tokens,
        img_cos,
        img_sin,
        torch.cat([img_cos, cap_cos[None]], dim=1),
        torch.cat([img_sin, cap_sin[None]], dim=1),
        slots.register_rows,
    )
    lengths = (branch.caption_tokens.shape[1],)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    latents = torch.randn(1, n, 64, generator=gen).to(device, dtype)  # 2x2 patches of 16 channels

    def forward(lens):
        def run(tokens, timestep, *tensors):
            return fast(tokens, timestep, ZImageFastInputs(*tensors), lens, compile)

        return run

    def tensors(step: int, lat: torch.Tensor | None = None) -> tuple:
        lat = latents if lat is None else lat
        timestep = torch.tensor([1.0 - sigmas[step]], device=device, dtype=torch.float32)
        return (lat, timestep, *inputs.tensors())

    def update(lat, out, sigma, sigma_next):
        return (lat.float() + (sigma_next - sigma) * (-out.float())).to(lat.dtype)

    name = f"z-image-turbo-{size}"
    return Workload(name, "z-image", fast, fast.stages, z_stages, forward, tensors, lengths, steps, compile, update,
                    latents, sigmas)  # fmt: skip


# ------------------------------------------------------------------------------------------------- measures
class _Spy:
    """Stages that record the `target` block's arguments and then stop the forward (eager: `compile` is
    ignored); blocks before it run today's stages."""

    class Stop(Exception):
        pass

    def __init__(self, default: BlockStages, target: torch.nn.Module) -> None:
        self.default = default.raw
        self.target = target
        self.args: dict[str, tuple] = {}

    def __call__(self, compile: bool):
        def pre(block, *args):
            if block is self.target:
                self.args["pre"] = (block, args)
            return self.default[0](block, *args)

        def post(block, *args):
            if block is not self.target:
                return self.default[1](block, *args)
            self.args["post"] = (block, args)
            raise _Spy.Stop

        return pre, post


def _bind(fn: Callable, block, values: tuple) -> tuple[Callable, tuple]:
    """`fn(block, *values)` as a function of the tensor values only (constants such as None stay put)."""
    positions = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]

    def call(*tensors):
        full = list(values)
        for pos, t in zip(positions, tensors, strict=True):
            full[pos] = t
        return fn(block, *full)

    return call, tuple(_clone(values[i]) for i in positions)


class PolicySwitch:
    """Quantize every block linear once, then show the stage functions only a policy's groups (the others'
    buffers are set aside, so `fp8.has_fp8` is False for them and they run bf16)."""

    NAMES = ("fp8_weight", "fp8_scale", "fp8_bias")

    def __init__(self, model: fp8.Fp8Model) -> None:
        self.model = model
        self.stash: dict[fp8.Fp8Group, tuple] = {}

    def apply(self, policy: fp8.Fp8Policy) -> int:
        self.restore()
        tr = self.model.transformer
        for group in self.model.groups:
            if policy.keeps_bf16(group, len(getattr(tr, group.stack))):
                owner = self.model.owner(group)
                self.stash[group] = tuple(owner._buffers[group.prefix + n] for n in self.NAMES)
                for n in self.NAMES:
                    owner._buffers[group.prefix + n] = None
        return len(self.model.groups) - len(self.stash)

    def restore(self) -> None:
        for group, tensors in self.stash.items():
            owner = self.model.owner(group)
            for n, t in zip(self.NAMES, tensors, strict=True):
                owner._buffers[group.prefix + n] = t
        self.stash.clear()


class Bench:
    def __init__(self, args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
        self.args = args
        self.report = report
        self.device = device
        self.dtype = dtype
        self.refs: dict[str, torch.Tensor] = {}
        self.trajectories: dict[str, torch.Tensor] = {}
        self.usable = {"norm": True, "qk": True}
        self.compile = not args.smoke or args.smoke_compile

    def ok(self, recipe: Recipe | None) -> bool:
        """False for recipes that need a kernel the probes found broken."""
        if recipe is None:
            return True
        if "triton" in (recipe.pre_norm, recipe.post_norm) and not self.usable["norm"]:
            return False
        return recipe.qk != "triton" or self.usable["qk"]

    # -- whole forwards
    def forward(self, work: Workload, label: str, recipe: Recipe | None, *, options=None, trajectory=False,
                replays=None, ref: str | None = None) -> dict:  # fmt: skip
        work.use(recipe, options)
        result, out, captured = timed(work.forward(work.lengths), work.tensors(0), replays or self.args.replays)
        ref = ref or work.name
        if label == "today":
            self.refs[ref] = out
        elif ref in self.refs:
            result.update(fidelity(out, self.refs[ref]))
        if trajectory:
            final = self._trajectory(work, captured)
            if label == "today":
                self.trajectories[ref] = final
            elif ref in self.trajectories:
                result.update(traj_cosine=cosine(final, self.trajectories[ref]),
                              traj_psnr_db=range_psnr(final, self.trajectories[ref]))  # fmt: skip
        del captured
        work.use(None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"workload": work.name, "variant": label, "recipe": recipe.label if recipe else "today", **result}

    def _trajectory(self, work: Workload, captured: Captured) -> torch.Tensor:
        lat = work.latents.clone()
        for step in range(work.steps):
            out = captured.run(*work.tensors(step, lat))
            lat = work.update(lat, out, work.sigmas[step], work.sigmas[step + 1])
        return lat.float()

    def record(self, work: Workload, label: str, recipe: Recipe | None, estimate_s: float, **kwargs) -> dict | None:
        if not self.ok(recipe):
            return self.report.add(kind="forward", name=f"{work.name}: {label}", skipped="kernel failed its probe")
        return guarded(self.report, "forward", f"{work.name}: {label}", estimate_s,
                       lambda: self.forward(work, label, recipe, **kwargs))  # fmt: skip

    def profile(self, work: Workload, label: str, recipe: Recipe | None, estimate_s: float) -> None:
        def run():
            work.use(recipe)
            try:
                table = profile_table(work.forward(work.lengths), work.tensors(0))
            finally:
                work.use(None)
            self.report.data["profiles"][f"{work.name}: {label}"] = table
            return {"total_ms": round(table["total_ms"], 3), "by_kind_ms": table["by_kind_ms"]}

        guarded(self.report, "profile", f"{work.name}: {label}", estimate_s, run)

    # -- block stages in isolation (the workload's block / layer 0 with its real inputs)
    def block_args(self, work: Workload) -> dict:
        tr = work.fast.transformer
        target = tr.transformer_blocks[0] if work.family == "qwen-image" else tr.layers[0]
        spy = _Spy(work.default_stages, target)
        work.fast.stages = spy
        try:
            with torch.no_grad():
                work.forward(work.lengths)(*work.tensors(0))
        except _Spy.Stop:
            pass
        finally:
            work.use(None)
        return spy.args

    def stage(self, work: Workload, args: dict, which: str, recipe: Recipe | None, estimate_s: float) -> dict | None:
        """Time one stage (`pre` or `post`) of `recipe` on block 0 (graph replays); cosine against today's."""
        label = recipe.label if recipe else "today"
        if not self.ok(recipe):
            name = f"{work.name} {which}: {label}"
            return self.report.add(kind="stage", name=name, skipped="kernel failed its probe")

        def run():
            pre, post = work.make_stages(recipe) if recipe is not None else work.default_stages.raw
            fn = BlockStages(pre, post)(work.compile)[0 if which == "pre" else 1]
            block, values = args[which]
            call, tensors = _bind(fn, block, values)
            result, out, captured = timed(call, tensors, self.args.replays * 4)
            del captured
            key = f"{work.name}:{which}"
            if recipe is None:
                self.refs[key] = out
            elif key in self.refs:
                result.update(fidelity(out, self.refs[key]))
            return {"workload": work.name, "stage": which, "recipe": label, **result}

        rec = guarded(self.report, "stage", f"{work.name} {which}: {label}", estimate_s, run)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rec

    def best_stage(self, records: list[dict | None], min_cosine: float) -> dict | None:
        good = [r for r in records if r and "ms" in r and r.get("cosine", 1.0) >= min_cosine and r.get("finite", True)]
        return min(good, key=lambda r: r["ms"]) if good else None

    # -- attention batching (Qwen's CFG rows)
    def attention_rows(self, work: Workload) -> None:
        def run():
            attn = work.fast.transformer.transformer_blocks[0].attn
            heads, dim = attn.heads, attn.inner_dim // attn.heads
            image = work.latents.shape[1]
            out = {}
            for label, lengths in (("per_row", work.lengths), ("one_call", (max(work.lengths),) * len(work.lengths))):
                total = image + max(lengths)
                valid = tuple(image + n for n in lengths)
                q, k, v = (torch.randn(len(lengths), total, heads, dim, device=self.device, dtype=self.dtype)
                           for _ in range(3))  # fmt: skip

                def attend(q, k, v, valid=valid, total=total):
                    return join_rows(attention_rows(q, k, v, valid), total)

                res, _, captured = timed(attend, (q, k, v), self.args.replays * 4)
                del captured
                out[f"{label}_ms"] = res["ms"]
            return {"workload": work.name, "lengths": list(work.lengths), **out}

        guarded(self.report, "attention", f"{work.name}: CFG rows per row vs one call", 20, run)


# ------------------------------------------------------------------------------------------------------ probes
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def probe_scaled_mm(report: Report, device) -> None:
    def run():
        out = {}
        gen = torch.Generator(device=device).manual_seed(0)
        for m in (48, 40):
            a = torch.randn(m, 3072, device=device, generator=gen).to(fp8.FP8_DTYPE)
            b = torch.randn(3072, 3072, device=device, generator=gen).to(fp8.FP8_DTYPE)
            sa = torch.ones(m, 1, device=device)
            sb = torch.ones(1, 3072, device=device)
            bias = torch.randn(3072, device=device, generator=gen).bfloat16()
            for label, kwargs in (("bias", {"bias": bias}), ("nobias", {}), ("slow_accum", {"use_fast_accum": False})):
                try:
                    torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, **kwargs)
                    sync()
                    out[f"M{m}_{label}"] = "ok"
                except Exception as exc:  # noqa: BLE001 - the probe records what the card refuses
                    out[f"M{m}_{label}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        if out.get("M48_bias") != "ok":
            fp8.OPTIONS.bias_in_matmul = False
        x = torch.randn(40, 3072, device=device, dtype=torch.bfloat16, generator=gen)
        w = torch.randn(9216, 3072, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
        bias = torch.randn(9216, device=device, dtype=torch.bfloat16, generator=gen)
        q, s = fp8.quantize_rows(w)
        ref = F.linear(x.float(), w.float(), bias.float())
        out["linear_M40_rel_err"] = _rel(fp8.linear(x, q, s.reshape(1, -1), bias), ref)
        out["bf16_M40_rel_err"] = _rel(F.linear(x, w, bias), ref)
        out["bias_in_matmul"] = fp8.OPTIONS.bias_in_matmul
        return out

    guarded(report, "probe", "scaled_mm row-wise", 20, run)


def probe_kernels(report: Report, bench: Bench, device, dtype) -> None:
    """Each Triton kernel against its fallback on bf16 data of the real shapes (GPU only)."""
    gen = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    def run_norm():
        out, worst = {}, 0.0
        for name, dim, rms in (("qwen", 3072, False), ("z", 3840, True)):
            x, y = rnd(2, 4099, dim), rnd(2, 4099, dim)
            gate, mul, add = rnd(1, 1, dim, scale=0.3), 1 + rnd(1, 1, dim, scale=0.1), rnd(1, 1, dim, scale=0.1)
            w = (1 + rnd(dim, scale=0.1)) if rms else None
            yw = (1 + rnd(dim, scale=0.1)) if rms else None
            ref_res = fused_ops._residual(x, y, gate, yw, 1e-5)
            ref = fused_ops._modulated(ref_res, mul, add, w, 1e-6, rms)
            res, got = fused_ops.residual_norm_modulate(x, y, gate, yw, 1e-5, mul, add, w, 1e-6, rms)
            out[f"{name}_residual_rel"], out[f"{name}_out_rel"] = _rel(res, ref_res), _rel(got, ref)
            res8, q, s = fused_ops.residual_norm_modulate_fp8(x, y, gate, yw, 1e-5, mul, add, w, 1e-6, rms)
            rq, rs = fused_ops._quantized(ref)
            out[f"{name}_fp8_rel"] = _rel(q.float() * s, rq.float() * rs)
            out[f"{name}_fp8_scale_rel"] = _rel(s, rs)
            out[f"{name}_fp8_padded_rows"] = q.shape[0]
            plain = fused_ops.norm_modulate(x, mul, add, w, 1e-6, rms)
            out[f"{name}_plain_rel"] = _rel(plain, fused_ops._modulated(x, mul, add, w, 1e-6, rms))
            worst = max(worst, out[f"{name}_out_rel"], out[f"{name}_plain_rel"], out[f"{name}_residual_rel"],
                        out[f"{name}_fp8_rel"] / 3)  # fmt: skip
        bench.usable["norm"] = worst < 2e-2
        return {"usable": bench.usable["norm"], **out}

    def run_qk():
        out, worst = {}, 0.0
        heads, dim = 24, 128
        segs = [rnd(2, 4096, 3 * heads * dim), rnd(2, 27, 3 * heads * dim)]
        weights = [1 + rnd(dim, scale=0.1) for _ in range(4)]
        angles = [torch.rand(n, dim // 2, device=device, generator=gen) * 6 for n in (4096, 27)]
        coss, sins = [a.cos() for a in angles], [a.sin() for a in angles]
        got = fused_ops.qk_norm_rope_joint(segs, weights, coss, sins, heads, 1e-6)
        parts = [fused_ops._heads_reference(t, heads, weights[2 * i], weights[2 * i + 1], coss[i], sins[i], 1e-6)
                 for i, t in enumerate(segs)]  # fmt: skip
        for j, name in enumerate("qkv"):
            ref = torch.cat([p[j] for p in parts], dim=1)
            out[f"joint_{name}_rel"] = _rel(got[j], ref)
            worst = max(worst, out[f"joint_{name}_rel"])
        z_heads = 30
        qkv = rnd(1, 4128, 3 * z_heads * dim)
        ang = torch.rand(1, 4128, dim // 2, device=device, generator=gen) * 6
        q, k = fused_ops.qk_norm_rope(qkv, weights[0], weights[1], ang.cos(), ang.sin(), z_heads, 1e-5)
        rq, rk, _ = fused_ops._heads_reference(qkv, z_heads, weights[0], weights[1], ang.cos(), ang.sin(), 1e-5)
        out["single_q_rel"], out["single_k_rel"] = _rel(q, rq), _rel(k, rk)
        worst = max(worst, out["single_q_rel"], out["single_k_rel"])
        bench.usable["qk"] = worst < 2e-2
        return {"usable": bench.usable["qk"], **out}

    for name, fn in (("norm kernels", run_norm), ("qk kernels", run_qk)):
        if guarded(report, "probe", name, 30, fn) is None:
            bench.usable["norm" if name.startswith("norm") else "qk"] = False


LINEAR_SHAPES = {  # (M, K, N): Qwen 1024^2 CFG (8192 image rows) and Z-Image-Turbo 1024^2 (4128 rows)
    "qwen qkv": (8192, 3072, 9216),
    "qwen mlp up": (8192, 3072, 12288),
    "qwen mlp down": (8192, 12288, 3072),
    "z w13": (4128, 3840, 20480),
}


def probe_linears(report: Report, device, replays: int, torchao: bool = False) -> None:
    """bf16 `F.linear` against FP8 (`fp8.linear`, quantize included, compiled; the bare `_scaled_mm`) at the
    DiTs' matmul shapes; with `torchao`, torchao's row-wise FP8 linear instead (imported last of all, so that
    whatever it registers cannot touch the other measurements)."""
    if torchao:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except Exception as exc:  # noqa: BLE001 - optional: record why
            report.add(kind="linear", name="torchao", skipped=f"{type(exc).__name__}: {str(exc)[:200]}")
            return
    gen = torch.Generator(device=device).manual_seed(2)
    for name, (m, k, n) in LINEAR_SHAPES.items():
        def run(m=m, k=k, n=n):
            x = (torch.randn(m, k, device=device, generator=gen)).bfloat16()
            w = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).bfloat16()
            b = torch.randn(n, device=device, generator=gen).bfloat16()
            flop = 2 * m * k * n
            out = {}
            res, ref, _ = timed(lambda x: F.linear(x, w, b), (x,), replays * 4)
            out["bf16_ms"] = res["ms"]
            if torchao:
                module = torch.nn.Sequential(torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16))
                with torch.no_grad():
                    module[0].weight.copy_(w)
                    module[0].bias.copy_(b)
                quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                ao = torch.compile(lambda x: module(x), fullgraph=True)
                res, got_ao, _ = timed(ao, (x,), replays * 4)
                rate = round(flop / (res["ms"] * 1e9), 1)
                return {"shape": [m, k, n], "bf16_ms": out["bf16_ms"], "torchao_ms": res["ms"],
                        "torchao_rel_err": _rel(got_ao, ref), "torchao_tflops": rate}  # fmt: skip
            q, s = fp8.quantize_rows(w)
            s = s.reshape(1, -1).contiguous()
            qx, sx = fp8.quantize_rows(x)
            bare = lambda qx, sx: fp8._cuda_scaled_mm(qx, q.t(), sx, s, b, torch.bfloat16)  # noqa: E731
            res, _, _ = timed(bare, (qx, sx), replays * 4)
            out["fp8_mm_ms"] = res["ms"]
            lin = torch.compile(lambda x: fp8.linear(x, q, s, b), fullgraph=True)
            res, got, _ = timed(lin, (x,), replays * 4)
            out["fp8_linear_ms"] = res["ms"]
            out["fp8_rel_err"] = _rel(got, ref)
            rates = {f"{key[:-3]}_tflops": round(flop / (v * 1e9), 1) for key, v in out.items() if key.endswith("_ms")}
            out.update(rates)
            return {"shape": [m, k, n], **out}

        guarded(report, "linear", f"{name}{' torchao' if torchao else ''}", 25, run)


# ------------------------------------------------------------------------------------------------------ phases
def build_transformer(family: str, smoke: bool, device, dtype):
    if smoke:
        from imagegen.common.checkpoint import open_model_folder
        from imagegen.common.tiny import tiny_checkpoint_cached

        variant = "turbo" if family == "z-image" else None
        folder = open_model_folder(tiny_checkpoint_cached(family, variant))
        return folder.load("transformer", dtype, device)
    from bench.e2e_gpu import full_size_transformer

    return full_size_transformer(family)


QWEN_QK = ("slice", "flip", "triton")
Z_QK = ("flip", "triton")


def _pick(bench: Bench, records: dict[Recipe, dict | None], min_cosine: float) -> Recipe:
    best = bench.best_stage(list(records.values()), min_cosine)
    return next((r for r, rec in records.items() if rec is best), next(iter(records)))


def choose(bench: Bench, work: Workload, args: dict, qks: tuple[str, ...], est: float) -> Recipe:
    """Block 0's stages: today's, then each QK arrangement (inductor norm), then the Triton norm with the best
    QK, and the Triton post-attention norm; the fastest of each step that keeps cosine >= 0.9999."""
    today = Recipe()
    pre = {today: bench.stage(work, args, "pre", None, est)}
    pre |= {Recipe(qk=q): bench.stage(work, args, "pre", Recipe(qk=q), est) for q in qks}
    qk = _pick(bench, pre, 0.9999).qk
    norm = {Recipe(qk=qk): pre[Recipe(qk=qk)]} if Recipe(qk=qk) in pre else {}
    norm[Recipe(pre_norm="triton", qk=qk)] = bench.stage(work, args, "pre", Recipe(pre_norm="triton", qk=qk), est)
    best_pre = _pick(bench, norm, 0.9999)
    post = {today: bench.stage(work, args, "post", None, est)}
    post[Recipe(post_norm="triton")] = bench.stage(work, args, "post", Recipe(post_norm="triton"), est)
    best_post = _pick(bench, post, 0.9999)
    return Recipe(pre_norm=best_pre.pre_norm, qk=best_pre.qk, post_norm=best_post.post_norm)


def choose_fp8(bench: Bench, work: Workload, args: dict, bf16: Recipe, est: float) -> Recipe:
    """The FP8 stage variants on top of the best bf16 arrangement (cosine against today's bf16 stages)."""
    base = dataclasses.replace(bf16, fp8=True)
    pres = [dataclasses.replace(base, pre_norm="inductor", fp8_norm=False)]
    pres += [dataclasses.replace(base, pre_norm="triton", fp8_norm=True)]
    posts = [dataclasses.replace(base, post_norm="inductor", fp8_norm=False),
             dataclasses.replace(base, post_norm="triton", fp8_norm=True),
             dataclasses.replace(base, post_norm="inductor", fold_gates=True)]  # fmt: skip
    pre = _pick(bench, {r: bench.stage(work, args, "pre", r, est) for r in pres}, 0.99)
    post = _pick(bench, {r: bench.stage(work, args, "post", r, est) for r in posts}, 0.99)
    return dataclasses.replace(base, pre_norm=pre.pre_norm, post_norm=post.post_norm,
                               fp8_norm=pre.fp8_norm or post.fp8_norm, fold_gates=post.fold_gates)  # fmt: skip


def fp8_memory(report: Report, work: Workload, model: fp8.Fp8Model) -> None:
    tr = work.fast.transformer
    total = sum(p.numel() * p.element_size() for p in tr.parameters())
    sizes = model.nbytes()
    fp8_bytes = sizes["fp8_weights"] + sizes["fp8_scales"]
    report.add(kind="memory", name=f"{work.name}: FP8 weights", quantize_s=round(model.seconds, 2),
               groups=len(model.groups), skipped_groups=len(model.skipped), transformer_bf16_gib=total / 2**30,
               quantized_bf16_gib=sizes["bf16_weights"] / 2**30, fp8_gib=fp8_bytes / 2**30,
               fp8_transformer_gib=(total - sizes["bf16_weights"] + fp8_bytes) / 2**30)  # fmt: skip


def phase_qwen(bench: Bench, tr, smoke: bool, device, dtype) -> dict:
    args = bench.args
    size = 64 if smoke else 1024
    lengths = (7, 3) if smoke else QWEN_LENGTHS
    work = qwen_workload(tr, size, lengths, device, dtype, compile=bench.compile, steps=args.steps)
    est = 20 if not smoke else 1
    fwd = 35 if not smoke else 1
    bench.record(work, "today", None, fwd, trajectory=True)
    stage_args = bench.block_args(work)
    best = bench.args.qwen_recipe or choose(bench, work, stage_args, QWEN_QK, est)
    bench.attention_rows(work)
    best_bf16 = bench.record(work, "best bf16", best, fwd, trajectory=True)
    equal = qwen_workload(tr, size, (max(lengths),) * 2, device, dtype, compile=bench.compile, steps=args.steps,
                          suffix=" equal lengths")  # fmt: skip
    bench.record(equal, "today, equal prompt lengths (one attention call)", None, fwd)
    model = fp8.quantize(tr, "blocks")
    fp8_memory(bench.report, work, model)
    switch = PolicySwitch(model)
    best8 = choose_fp8(bench, work, stage_args, best, est)
    results = {}
    for policy in ("blocks", "sglang", "vllm-omni", "edges"):
        switch.apply(fp8.POLICIES[policy])
        results[policy] = bench.record(work, f"fp8 {policy}", best8, fwd, trajectory=True)
    best_policy = _best_policy(results)
    switch.apply(fp8.POLICIES[best_policy])
    prof = 15 if not smoke else 1
    bench.profile(work, "best bf16", best if best_bf16 else None, prof)
    bench.profile(work, f"fp8 {best_policy}", best8, prof)
    switch.restore()
    return {"work": work, "best": best, "best8": best8, "policy": best_policy, "model": model, "switch": switch}


def _best_policy(results: dict[str, dict | None]) -> str:
    """The fastest policy whose 8-step trajectory keeps cosine >= 0.999 (else the most faithful)."""
    done = {k: v for k, v in results.items() if v and "ms" in v}
    if not done:
        return "sglang"
    faithful = {k: v for k, v in done.items() if v.get("traj_cosine", 0) >= 0.999}
    if faithful:
        return min(faithful, key=lambda k: faithful[k]["ms"])
    return max(done, key=lambda k: done[k].get("traj_cosine", 0))


def phase_qwen_2048(bench: Bench, qwen: dict, smoke: bool, device, dtype) -> None:
    tr = qwen["work"].fast.transformer
    size = 128 if smoke else 2048
    lengths = (7, 3) if smoke else QWEN_LENGTHS
    work = qwen_workload(tr, size, lengths, device, dtype, compile=bench.compile, steps=bench.args.steps)
    fwd = 60 if not smoke else 1
    replays = max(2, bench.args.replays // 2)
    bench.record(work, "today", None, fwd, replays=replays)
    bench.record(work, "best bf16", qwen["best"], fwd, replays=replays)
    qwen["switch"].apply(fp8.POLICIES[qwen["policy"]])
    bench.record(work, f"fp8 {qwen['policy']}", qwen["best8"], fwd, replays=replays)
    prof = 25 if not smoke else 1
    bench.profile(work, "best bf16", qwen["best"], prof)
    bench.profile(work, f"fp8 {qwen['policy']}", qwen["best8"], prof)
    qwen["switch"].restore()


Z_POLICIES = {"blocks": fp8.POLICIES["blocks"], "edges": fp8.POLICIES["edges"],
              "late-bf16": fp8.Fp8Policy(keep_last=15)}  # fmt: skip  # vLLM-Omni's Z-Image quality gate


def phase_z(bench: Bench, smoke: bool, device, dtype) -> dict:
    tr = build_transformer("z-image", smoke, device, dtype)
    work = z_workload(tr, 64 if smoke else 1024, 7 if smoke else Z_CAPTION, device, dtype, compile=bench.compile,
                      steps=bench.args.steps)  # fmt: skip
    est, fwd, prof = (15, 20, 10) if not smoke else (1, 1, 1)
    bench.record(work, "today", None, fwd, trajectory=True)
    stage_args = bench.block_args(work)
    best = bench.args.z_recipe or choose(bench, work, stage_args, Z_QK, est)
    best_bf16 = bench.record(work, "best bf16", best, fwd, trajectory=True)
    model = fp8.quantize(tr, "blocks")
    fp8_memory(bench.report, work, model)
    switch = PolicySwitch(model)
    best8 = choose_fp8(bench, work, stage_args, best, est)
    results = {}
    for name, policy in Z_POLICIES.items():
        switch.apply(policy)
        results[name] = bench.record(work, f"fp8 {name}", best8, fwd, trajectory=True)
    chosen = _best_policy(results) if any(results.values()) else "blocks"
    switch.apply(Z_POLICIES.get(chosen, Z_POLICIES["blocks"]))
    bench.profile(work, "best bf16", best if best_bf16 else None, prof)
    bench.profile(work, f"fp8 {chosen}", best8, prof)
    switch.restore()
    return {"work": work, "model": model}


INDUCTOR_OPTIONS = {
    "coordinate_descent_tuning": {"coordinate_descent_tuning": True},
    "max_autotune (no cudagraphs)": {"max_autotune": True, "triton.cudagraphs": False},
}


def phase_inductor(bench: Bench, qwen: dict) -> None:
    work = qwen["work"]
    for name, options in INDUCTOR_OPTIONS.items():
        bench.record(work, f"best bf16 + {name}", qwen["best"], 150, options=options)


def release(report: Report, name: str, model: fp8.Fp8Model) -> None:
    def allocated() -> float:
        sync()
        return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0

    def run():
        before = allocated()
        freed = model.release_master()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"freed_gib": freed / 2**30, "allocated_gib_before": before, "allocated_gib_after": allocated()}

    guarded(report, "memory", f"{name}: release bf16 masters", 10, run)


# ------------------------------------------------------------------------------------------------------- table
def table(report: Report) -> str:
    lines = ["| workload | variant | ms / forward | vs today | cosine | SNR dB | 8-step cosine | 8-step PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    today = {r["workload"]: r["ms"] for r in report.data["records"] if r.get("variant") == "today" and "ms" in r}
    for r in report.data["records"]:
        if r.get("kind") != "forward":
            continue
        if "ms" not in r:
            lines.append(f"| {r['name']} | | {r.get('skipped') or r.get('error', '')[:60]} | | | | | |")
            continue
        base = today.get(r["workload"])
        ratio = f"{base / r['ms']:.3f}x" if base else ""

        cells = [format(r[key], fmt) if key in r else "" for key, fmt in
                 (("cosine", ".6f"), ("snr_db", ".1f"), ("traj_cosine", ".6f"), ("traj_psnr_db", ".1f"))]  # fmt: skip
        lines.append(f"| {r['workload']} | {r['variant']} ({r['recipe']}) | {r['ms']:.2f} | {ratio} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "| workload | stage | recipe | ms | cosine |", "|---|---|---|---|---|"]
    for r in report.data["records"]:
        if r.get("kind") == "stage" and "ms" in r:
            cos = r.get("cosine", 1.0)
            lines.append(f"| {r['workload']} | {r['stage']} | {r['recipe']} | {r['ms']:.3f} | {cos:.6f} |")
    for r in report.data["records"]:
        if r.get("kind") in ("linear", "attention", "memory"):
            keys = {k: v for k, v in r.items() if k not in ("kind", "at_s", "trace")}
            lines.append(f"- {r['kind']}: " + json.dumps(keys, default=str))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
PHASES = ("probes", "qwen-1024", "z-image", "qwen-2048", "inductor", "torchao")


def parse_recipe(text: str) -> Recipe:
    names = {"pre": "pre_norm", "qk": "qk", "post": "post_norm"}
    fields = dict(part.split("=", 1) for part in text.split(",") if part)
    unknown = set(fields) - set(names)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown recipe keys {sorted(unknown)}; known: {', '.join(names)}")
    return Recipe(**{names[k]: v for k, v in fields.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU, float32")
    parser.add_argument("--smoke-compile", action="store_true", help="smoke with dynamo tracing (eager backend)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--budget-s", type=float, default=520.0, help="start no measurement that would end later")
    parser.add_argument("--replays", type=int, default=10, help="timed graph replays per forward (median)")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps of the fidelity trajectories")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    parser.add_argument("--qwen-recipe", type=parse_recipe, help="skip the stage choice: pre=triton,qk=flip,post=...")
    parser.add_argument("--z-recipe", type=parse_recipe, help="the same for Z-Image")
    args = parser.parse_args(argv)
    configure_compiler()  # start-up, as `imagegen serve`
    torch.set_grad_enabled(False)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU: use --smoke")
    if args.smoke:
        args.replays, args.steps = 2, 2
        if args.smoke_compile:
            os.environ.setdefault("IMAGEGEN_COMPILE_BACKEND", "eager")  # trace whole (dynamo), no codegen
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    report = Report(Path(args.out), args.budget_s)
    report.data["env"] = {
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": getattr(fused_ops.triton, "__version__", None),
        "smoke": args.smoke,
        "phases": phases,
    }
    report.save()
    bench = Bench(args, report, device, dtype)
    if "probes" in phases and not args.smoke:
        probe_scaled_mm(report, device)
        probe_kernels(report, bench, device, dtype)
        probe_linears(report, device, args.replays)
    elif args.smoke:
        bench.usable = {"norm": True, "qk": True}  # CPU: the fallbacks run
    # Priority order (the budget cuts the tail): Qwen 1024^2, Z-Image-Turbo, Qwen 2048^2, compiler options.
    qwen = z = None
    if {"qwen-1024", "qwen-2048", "inductor"} & set(phases):
        tr = build_transformer("qwen-image", args.smoke, device, dtype)
        qwen = phase_qwen(bench, tr, args.smoke, device, dtype)
    if "z-image" in phases:
        z = phase_z(bench, args.smoke, device, dtype)
    if "qwen-2048" in phases and qwen is not None:
        phase_qwen_2048(bench, qwen, args.smoke, device, dtype)
    if "inductor" in phases and qwen is not None and not args.smoke:
        phase_inductor(bench, qwen)
    if "torchao" in phases and not args.smoke:
        probe_linears(report, device, args.replays, torchao=True)
    for name, part in (("qwen-image", qwen), ("z-image", z)):
        if part is not None:
            release(report, name, part["model"])
    from torch._dynamo.utils import counters

    report.data["dynamo"] = {"stats": dict(counters["stats"]), "recompile_reasons": len(counters["recompiles"])}
    report.data["elapsed_s"] = report.elapsed()
    report.save()
    print("\n" + table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
