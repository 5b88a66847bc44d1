"""FP8 (e4m3) block linears for `--precision fp8`: weights quantized once per output channel, activations per
token row on every call, multiplied on the card's FP8 tensor cores by `torch._scaled_mm` with row-wise scales.

Why our own ~200 lines and not torchao's `Float8DynamicActivationFloat8WeightConfig(PerRow())`: both end in the
same `torch._scaled_mm` row-wise kernel and both quantize activations with plain PyTorch ops that the compiler
fuses into the kernel producing them (LayerNorm + modulation + quantize in one pass), so there is no speed to win
there; but the fast path multiplies by fused buffers (`attn.img_qkv_weight`), not by `nn.Linear` modules that
torchao's module swap could reach, cuBLAS rejects row counts that are not a multiple of 16 (a 40-token prompt),
which torchao does not pad, and a LoRA merge must re-quantize only the rows it touched and restore the base
FP8 bytes exactly. Here that is all explicit, with no dependency to carry or pin.

* Scales: `x ~= q * s` with `s = amax(row) / 448` per activation row (token) and per weight row (output
  channel), float32; the matmul computes `(q_x q_w^T) * s_x * s_w^T` in float32 and rounds once to bf16.
* Shapes: M, K, N must be multiples of 16. K and N are the model's (checked when quantizing; an unaligned
  linear stays bf16); M (tokens) is padded with zero rows up to the next multiple and the output sliced back,
  inside the compiled code, where the padding fuses into the quantize kernel. Padding rows cannot change real
  rows: every scale is per row.
* Off CUDA (the CPU tests) the same quantize / dequantize maths runs, with the product emulated in float32
  (`emulated_scaled_mm`), through the same padding and alignment checks.
* Layer selection (`family_groups`, `Fp8Policy`): only the DiT blocks' attention and MLP linears. Embedders,
  timestep / modulation linears (`img_mod`, `txt_mod`, `adaLN_modulation`), Z-Image's caption refiner (run once
  per request) and the final norm / projection stay bf16, as sglang, vLLM-Omni and cache-dit keep them; the
  policies add their known-sensitive extras (sglang: Qwen's `img_mlp.net.2`; vLLM-Omni: all of `img_mlp`;
  the first and last blocks).
* LoRA (`Fp8AdapterSlot`): merge in float32 from the bf16 master when it is kept, else from the dequantized
  base, re-quantize only the touched rows in place (compiled and captured graphs read the new bytes), and
  restore the saved FP8 rows, scales and bias bit for bit.

(This module holds the two families' layer tables until the structure refactor gives each family its own
`dit_fast.py`; they move there then.)
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
ALIGN = 16  # cuBLAS / CUTLASS row-wise FP8: every matmul dim a multiple of 16
AMAX_FLOOR = 1e-12  # an all-zero row (padding) gets a tiny scale, not a division by zero


# ------------------------------------------------------------------------------------------- quantize maths
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[..., K]` -> (`q` FP8 `[..., K]`, `s` float32 `[..., 1]`) with `q * s ~= x`, each row's largest
    magnitude mapped to 448. The relative error of an element is <= 2^-4 (3 mantissa bits), or an absolute
    `s * 2^-10` below the normal range."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # the clamp guards the rounding of 448
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def pad_rows(x: torch.Tensor, multiple: int = ALIGN) -> torch.Tensor:
    """`x` `[M, K]` with zero rows appended up to a multiple of `multiple`. A static aligned M is returned as is;
    a symbolic M (the compiled blocks' dynamic text length) is always padded, by an amount that may be 0, so
    that no guard on M's remainder splits the compiled graph."""
    rows = x.shape[0]
    if isinstance(rows, int) and rows % multiple == 0:
        return x
    return F.pad(x, (0, 0, 0, (-rows) % multiple))


def check_aligned(a: torch.Tensor, b_t: torch.Tensor) -> None:
    """The row-wise FP8 kernels' shape rule, also enforced where the product is emulated (so CPU tests catch
    what the GPU would reject)."""
    m, k = a.shape
    n = b_t.shape[1]
    for name, value in (("M", m), ("K", k), ("N", n)):
        if isinstance(value, int) and value % ALIGN:
            raise ValueError(f"FP8 matmul needs {name} % {ALIGN} == 0, got {name} = {value}")


def emulated_scaled_mm(
    a: torch.Tensor,
    b_t: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`torch._scaled_mm(a, b_t, scale_a, scale_b, bias, out_dtype=...)` with row-wise scales, in float32."""
    check_aligned(a, b_t)
    out = (a.float() * scale_a) @ (b_t.float() * scale_b)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@dataclass
class MatmulOptions:
    """How the CUDA product runs (the benchmark flips these; the defaults are what serving uses)."""

    fast_accum: bool = True  # Hopper's faster FP8 accumulation, as torchao's inference default
    bias_in_matmul: bool = True  # bias in the kernel's epilogue, else one add after (fused by the compiler)


OPTIONS = MatmulOptions()


def _cuda_scaled_mm(a, b_t, scale_a, scale_b, bias, out_dtype):
    fused_bias = bias if OPTIONS.bias_in_matmul else None
    out = torch._scaled_mm(
        a, b_t, scale_a=scale_a, scale_b=scale_b, bias=fused_bias, out_dtype=out_dtype,
        use_fast_accum=OPTIONS.fast_accum,
    )  # fmt: skip
    return out if bias is None or fused_bias is not None else out + bias


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_scale: torch.Tensor | None = None,
    emulate: bool | None = None,
) -> torch.Tensor:
    """`F.linear(x, W, b)` for `W ~= weight * scale^T` (`weight` FP8 `[N, K]`, `scale` float32 `[1, N]`): `x`
    `[..., K]` quantized per row, output `[..., N]` in `x.dtype` (bf16 on CUDA).

    `out_scale` `[N]` (or any shape of N elements) multiplies the output per channel inside the kernel's
    scales: a block's gate folded in (`gate * linear(x)`), bias included, for free."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    q, s = quantize_rows(pad_rows(flat))
    lead = x.shape[:-1]
    return linear_quantized(q, s, weight, scale, bias, rows, lead, x.dtype, out_scale=out_scale, emulate=emulate)


def linear_quantized(
    q: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    rows,
    lead_shape,
    out_dtype: torch.dtype,
    *,
    out_scale: torch.Tensor | None = None,
    emulate: bool | None = None,
) -> torch.Tensor:
    """The product for activations already quantized (`q` `[M_padded, K]`, `s` `[M_padded, 1]`, e.g. by a fused
    norm kernel): the first `rows` output rows, shaped `[*lead_shape, N]`."""
    col = scale
    if out_scale is not None:
        gain = out_scale.float().reshape(1, -1)
        col = scale * gain
        if bias is not None:
            bias = (bias.float() * gain.reshape(-1)).to(bias.dtype)
    use_emulation = emulate if emulate is not None else not q.is_cuda
    mm = emulated_scaled_mm if use_emulation else _cuda_scaled_mm
    out = mm(q, weight.t(), s, col, bias, out_dtype)
    return out[:rows].view(*lead_shape, weight.shape[0])


# ------------------------------------------------------------------------------------------ layer selection
@dataclass(frozen=True)
class Fp8Group:
    """One FP8 matmul: the row-wise concatenation of `members` (module paths of `nn.Linear`s), stored as
    buffers `<prefix>fp8_weight`, `<prefix>fp8_scale`, `<prefix>fp8_bias` on the module at `owner`. The prefix
    matches `imagegen.common.kernels.fuse_linears`' buffer names (`img_qkv_` -> `img_qkv_weight`); a single
    linear is its own owner with prefix ''."""

    owner: str
    prefix: str
    members: tuple[str, ...]
    stack: str  # the block list it lives in ("transformer_blocks", "layers", "noise_refiner")
    index: int  # its block's position in that list

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.prefix[:-1]}" if self.prefix else self.owner


def _qwen_groups(transformer: torch.nn.Module) -> list[Fp8Group]:
    groups = []
    for i, _ in enumerate(transformer.transformer_blocks):
        b = f"transformer_blocks.{i}"
        a = f"{b}.attn"
        specs = [
            (a, "img_qkv_", (f"{a}.to_q", f"{a}.to_k", f"{a}.to_v")),
            (a, "txt_qkv_", (f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj")),
            (f"{a}.to_out.0", "", (f"{a}.to_out.0",)),
            (f"{a}.to_add_out", "", (f"{a}.to_add_out",)),
        ]
        for stream in ("img_mlp", "txt_mlp"):
            specs += [(f"{b}.{stream}.net.0.proj", "", (f"{b}.{stream}.net.0.proj",))]
            specs += [(f"{b}.{stream}.net.2", "", (f"{b}.{stream}.net.2",))]
        groups += [Fp8Group(owner, prefix, members, "transformer_blocks", i) for owner, prefix, members in specs]
    return groups


def _z_image_groups(transformer: torch.nn.Module) -> list[Fp8Group]:
    groups = []
    for stack in ("noise_refiner", "layers"):  # context_refiner runs once per request: nothing to gain
        for i, _ in enumerate(getattr(transformer, stack)):
            a, f = f"{stack}.{i}.attention", f"{stack}.{i}.feed_forward"
            specs = [
                (a, "qkv_", (f"{a}.to_q", f"{a}.to_k", f"{a}.to_v")),
                (f"{a}.to_out.0", "", (f"{a}.to_out.0",)),
                (f, "w13_", (f"{f}.w1", f"{f}.w3")),
                (f"{f}.w2", "", (f"{f}.w2",)),
            ]
            groups += [Fp8Group(owner, prefix, members, stack, i) for owner, prefix, members in specs]
    return groups


def family_groups(transformer: torch.nn.Module) -> list[Fp8Group]:
    """Every block linear the fast path multiplies by, grouped as it fuses them (QKV, Z-Image's w1/w3)."""
    name = type(transformer).__name__
    if name.startswith("QwenImage"):
        return _qwen_groups(transformer)
    if name.startswith("ZImage"):
        return _z_image_groups(transformer)
    raise ValueError(f"no FP8 layer table for {name}")


MAIN_STACKS = ("transformer_blocks", "layers")


@dataclass(frozen=True)
class Fp8Policy:
    """Which block linears stay bf16 on top of the always-bf16 ones (embedders, modulation, final layers):
    members matching any `skip` pattern (fnmatch on module paths; a group stays bf16 if any member does), and
    the first `keep_first` / last `keep_last` blocks of the main stack."""

    skip: tuple[str, ...] = ()
    keep_first: int = 0
    keep_last: int = 0

    def keeps_bf16(self, group: Fp8Group, stack_len: int) -> str | None:
        """Why `group` stays bf16 under this policy, or None."""
        for member in group.members:
            for pattern in self.skip:
                if fnmatch.fnmatchcase(member, pattern):
                    return f"policy skips {pattern}"
        if group.stack in MAIN_STACKS and (group.index < self.keep_first or group.index >= stack_len - self.keep_last):
            return "policy keeps the edge blocks"
        return None


POLICIES = {
    "blocks": Fp8Policy(),  # every block linear (vLLM-Omni's Z-Image default)
    "sglang": Fp8Policy(skip=("*.img_mlp.net.2",)),  # sglang's Qwen-Image ModelOpt FP8 fallback
    "vllm-omni": Fp8Policy(skip=("*.img_mlp.*",)),  # vLLM-Omni's recommended Qwen-Image ignored_layers
    "edges": Fp8Policy(keep_first=2, keep_last=2),  # first and last blocks bf16 (sglang's NVFP4 profile)
}


# ------------------------------------------------------------------------------------------------ the model
def params(owner: torch.nn.Module, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The FP8 weight, scale and bias buffers of one group (what the fast path's block functions multiply by)."""
    return tuple(getattr(owner, prefix + name) for name in ("fp8_weight", "fp8_scale", "fp8_bias"))


def has_fp8(owner: torch.nn.Module, prefix: str = "") -> bool:
    return getattr(owner, prefix + "fp8_weight", None) is not None


def owner_linear(owner: torch.nn.Module, prefix: str, x: torch.Tensor, bf16: tuple, **kwargs) -> torch.Tensor:
    """`x` times this group's weights: FP8 when the group was quantized, else `F.linear(x, *bf16)`."""
    if has_fp8(owner, prefix):
        return linear(x, *params(owner, prefix), **kwargs)
    out = F.linear(x, *bf16)
    out_scale = kwargs.get("out_scale")
    return out if out_scale is None else out * out_scale


@dataclass
class Fp8Model:
    """The FP8 groups of one transformer and what quantizing them cost."""

    transformer: torch.nn.Module
    groups: list[Fp8Group]
    skipped: dict[str, str]  # group name -> why it stayed bf16
    seconds: float
    master_released: bool = False
    _rows: dict[str, tuple[Fp8Group, int, int]] = field(default_factory=dict)  # member -> (group, start, end)

    def covers(self, module: str) -> bool:
        return module in self._rows

    def locate(self, module: str) -> tuple[Fp8Group, int, int]:
        return self._rows[module]

    def owner(self, group: Fp8Group) -> torch.nn.Module:
        return self.transformer.get_submodule(group.owner)

    def nbytes(self) -> dict[str, int]:
        """bf16 bytes the quantized weights took, and the FP8 weight and scale bytes that replace them."""
        totals = {"bf16_weights": 0, "fp8_weights": 0, "fp8_scales": 0}
        for group in self.groups:
            weight, scale, _ = params(self.owner(group), group.prefix)
            totals["fp8_weights"] += weight.numel()
            totals["fp8_scales"] += scale.numel() * scale.element_size()
            totals["bf16_weights"] += weight.numel() * 2
        return totals

    @torch.no_grad()
    def release_master(self) -> int:
        """Free the bf16 weights the FP8 ones replace (the members' weights and the fast path's fused copies);
        returns the bytes freed. After this only the FP8 path can run these layers, and a LoRA merges from the
        dequantized base."""
        freed = 0
        for group in self.groups:
            tensors = [self.transformer.get_submodule(m).weight for m in group.members]
            owner = self.owner(group)
            fused = owner._buffers.get(group.prefix + "weight") if group.prefix else None
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
            if fused is not None:
                storages[fused.untyped_storage().data_ptr()] = fused.untyped_storage().nbytes()
                owner._buffers[group.prefix + "weight"] = fused.new_empty(0)
            freed += sum(storages.values())
            for t in tensors:
                t.data = t.new_empty(0)
        self.master_released = True
        return freed


@torch.no_grad()
def quantize(transformer: torch.nn.Module, policy: Fp8Policy | str = "blocks") -> Fp8Model:
    """Quantize the block linears `policy` selects, on the weights' device, registering the FP8 buffers on
    their owners. The bf16 weights stay (the reference path and fidelity checks use them) until
    `Fp8Model.release_master`. Idempotent per group."""
    policy = POLICIES[policy] if isinstance(policy, str) else policy
    start = time.perf_counter()
    groups, skipped, rows = [], {}, {}
    stack_lens = {s: len(getattr(transformer, s)) for s in (*MAIN_STACKS, "noise_refiner") if hasattr(transformer, s)}
    for group in family_groups(transformer):
        reason = policy.keeps_bf16(group, stack_lens[group.stack])
        linears = [transformer.get_submodule(m) for m in group.members]
        k = linears[0].in_features
        n = sum(lin.out_features for lin in linears)
        if reason is None and (k % ALIGN or n % ALIGN):
            reason = f"unaligned ({n} x {k})"
        if reason is not None:
            skipped[group.name] = reason
            continue
        owner = transformer.get_submodule(group.owner)
        if not has_fp8(owner, group.prefix):
            weight = torch.cat([lin.weight for lin in linears])
            q, s = quantize_rows(weight)
            biases = [lin.bias for lin in linears]
            bias = None if biases[0] is None else torch.cat(biases)
            owner.register_buffer(group.prefix + "fp8_weight", q, persistent=False)
            owner.register_buffer(group.prefix + "fp8_scale", s.reshape(1, -1).contiguous(), persistent=False)
            owner.register_buffer(group.prefix + "fp8_bias", bias, persistent=False)
        offset = 0
        for member, lin in zip(group.members, linears, strict=True):
            rows[member] = (group, offset, offset + lin.out_features)
            offset += lin.out_features
        groups.append(group)
    if transformer.device.type == "cuda":
        torch.cuda.synchronize(transformer.device)
    return Fp8Model(transformer, groups, skipped, time.perf_counter() - start, _rows=rows)


# --------------------------------------------------------------------------------------------------- LoRA
class Fp8AdapterSlot:
    """`imagegen.common.lora.merge.AdapterSlot`'s contract for the FP8 layers: the adapter set merged now
    (`key`) and the FP8 rows, scales and biases it replaced. Modules outside the FP8 groups are not touched
    here: `split` hands them back for the bf16 slot."""

    def __init__(self, model: Fp8Model) -> None:
        self.model = model
        self.key: Hashable = ()
        self._saved: dict[str, tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def split(self, adapters: Sequence[tuple[object, float]]) -> tuple[list, list]:
        """(adapters restricted to FP8 modules, adapters restricted to the rest), each as (layers, scale)."""
        mine, rest = [], []
        for adapter, scale in adapters:
            layers = adapter.layers
            mine.append(({m: layer for m, layer in layers.items() if self.model.covers(m)}, scale))
            rest.append(({m: layer for m, layer in layers.items() if not self.model.covers(m)}, scale))
        return mine, rest

    def use(self, key: Hashable, adapters: Sequence[tuple[object, float]]) -> None:
        with self._lock:
            if key == self.key:
                return
            self._restore()
            try:
                self._merge(adapters)
            except BaseException:
                self._restore()
                raise
            self.key = key

    def restore(self) -> None:
        with self._lock:
            self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        for member, (lo, hi, q, s, b) in self._saved.items():
            group, _, _ = self.model.locate(member)
            weight, scale, bias = params(self.model.owner(group), group.prefix)
            weight[lo:hi].copy_(q)
            scale[:, lo:hi].copy_(s)
            if b is not None:
                bias[lo:hi].copy_(b)
        self._saved.clear()
        self.key = ()

    @torch.no_grad()
    def _merge(self, adapters: Sequence[tuple[object, float]]) -> None:
        def layers_of(adapter):
            return adapter.layers if hasattr(adapter, "layers") else adapter

        modules = sorted({m for adapter, _ in adapters for m in layers_of(adapter) if self.model.covers(m)})
        for member in modules:  # one linear's rows at a time: the float32 work holds one weight at most
            group, lo, hi = self.model.locate(member)
            weight, scale, bias = params(self.model.owner(group), group.prefix)
            master = self.model.transformer.get_submodule(member).weight
            if master.numel():
                merged = master.detach().to(torch.float32, copy=True)
            else:
                merged = dequantize_rows(weight[lo:hi], scale[:, lo:hi].reshape(-1, 1))
            merged_bias = None
            for adapter, factor_scale in adapters:
                layer = layers_of(adapter).get(member)
                if layer is None:
                    continue
                factor = factor_scale * layer.scaling
                up = layer.up.to(merged.device, torch.float32)
                down = layer.down.to(merged.device, torch.float32)
                merged.addmm_(up, down, alpha=factor)
                if layer.up_bias is not None:
                    if bias is None:
                        raise ValueError(f"{member} has no bias for the adapter's lora_B bias")
                    if merged_bias is None:
                        merged_bias = bias[lo:hi].to(torch.float32, copy=True)
                    merged_bias.add_(layer.up_bias.to(merged.device, torch.float32), alpha=factor)
            saved_bias = bias[lo:hi].clone() if merged_bias is not None else None
            self._saved[member] = (lo, hi, weight[lo:hi].clone(), scale[:, lo:hi].clone(), saved_bias)
            q, s = quantize_rows(merged)
            # In place: compiled graphs and captured CUDA graphs hold these buffers' addresses.
            weight[lo:hi].copy_(q)
            scale[:, lo:hi].copy_(s.reshape(1, -1))
            if merged_bias is not None:
                bias[lo:hi].copy_(merged_bias)
