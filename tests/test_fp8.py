"""FP8 block linears (`imagegen.common.fp8`) as the CPU can check them: the same quantize / dequantize maths as the
GPU path, with the row-wise product emulated in float32. Round-trip bounds, per-row scales, the padding and
alignment rules of the row-wise kernels, the layer tables and policies, and LoRA merged in high precision,
re-quantized in place and restored bit for bit. The GPU kernels themselves run in bench/fast_variants_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel

from imagegen.common import fp8
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.lora.files import Adapter, LoraLayer
from imagegen.common.tiny import tiny_checkpoint_cached


def rows_of_mixed_magnitude(generator: torch.Generator) -> torch.Tensor:
    """Rows whose scales span 1e-4 .. 1e3, with some outliers: what per-row scaling is for."""
    x = torch.randn(32, 256, generator=generator)
    x *= torch.logspace(-4, 3, 32)[:, None]
    x[3, 7] *= 50
    return x


def within_fp8_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3: relative error <= 2^-4 for normal values, absolute <= s * 2^-10 below them."""
    err = (x - fp8.dequantize_rows(q, s)).abs()
    return err <= torch.maximum(x.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)


def row_errors(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x - fp8.dequantize_rows(q, s)).norm(dim=-1) / x.norm(dim=-1)


def test_quantize_rows_bounds_and_scales() -> None:
    x = rows_of_mixed_magnitude(torch.Generator().manual_seed(0))
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (32, 1)
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 448, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(-1), torch.full((32,), 448.0))  # each row's peak lands on 448
    assert within_fp8_bound(x, q, s).all()
    assert (row_errors(x, q, s) < 2**-4).all()
    # Trap: one scale for the whole tensor loses the small rows entirely.
    s_tensor = x.abs().amax().expand(32, 1) / 448
    q_tensor = (x / s_tensor).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert row_errors(x, q_tensor, s_tensor).max() > 0.5
    zero_q, zero_s = fp8.quantize_rows(torch.zeros(2, 16))
    assert torch.equal(zero_q.float(), torch.zeros(2, 16)) and bool((zero_s > 0).all())  # padding rows: no 0/0


def weights(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    q, s = fp8.quantize_rows(w)
    return w, q, s.reshape(1, -1), torch.randn(n, generator=g)


def test_linear_is_the_dequantized_product() -> None:
    w, q, s, b = weights(48, 64)
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(2))
    out = fp8.linear(x, q, s, b)
    assert out.shape == (2, 24, 48) and out.dtype == torch.float32
    xq, xs = fp8.quantize_rows(x.reshape(-1, 64))
    expected = F.linear(fp8.dequantize_rows(xq, xs), fp8.dequantize_rows(q, s.reshape(-1, 1)), b).view(2, 24, 48)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = F.linear(x, w, b)
    assert ((out - exact).norm() / exact.norm()).item() < 0.05  # FP8 activations and weights: a few percent
    gate = torch.rand(48, generator=torch.Generator().manual_seed(3)) + 0.5
    folded = fp8.linear(x, q, s, b, out_scale=gate.view(1, 1, 48))
    torch.testing.assert_close(folded, out * gate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_rows_are_padded_to_16_and_cut_back(rows: int, monkeypatch) -> None:
    _, q, s, b = weights(32, 48)
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
    seen = []
    real = fp8.emulated_scaled_mm

    def spy(a, b_t, *args):
        seen.append(tuple(a.shape))
        return real(a, b_t, *args)

    monkeypatch.setattr(fp8, "emulated_scaled_mm", spy)
    out = fp8.linear(x, q, s, b)
    assert seen == [(rows + (-rows) % 16, 48)] and out.shape == (rows, 32)
    alone = torch.cat([fp8.linear(x[i : i + 1], q, s, b) for i in range(rows)])
    assert torch.equal(out, alone)  # per-row scales: zero padding rows cannot move a real row


def test_unaligned_products_are_refused() -> None:
    _, q, s, b = weights(32, 48)
    xq, xs = fp8.quantize_rows(torch.randn(40, 48))
    with pytest.raises(ValueError, match="M % 16"):
        fp8.emulated_scaled_mm(xq, q.t(), xs, s, b, torch.float32)  # what cuBLAS rejects for 40 text tokens
    _, q_odd, s_odd, b_odd = weights(32, 40)
    with pytest.raises(ValueError, match="K % 16"):
        fp8.linear(torch.randn(16, 40), q_odd, s_odd, b_odd)


@pytest.fixture(scope="module")
def tiny_qwen() -> torch.nn.Module:
    return open_model_folder(tiny_checkpoint_cached("qwen-image", None)).load("transformer", torch.float32, "cpu")


ALWAYS_BF16 = ("img_mod", "txt_mod", "img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")


def test_qwen_layer_table_and_policies(tiny_qwen) -> None:
    model = fp8.quantize(tiny_qwen, "blocks")
    names = {g.name for g in model.groups}
    per_block = {"attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"}  # fmt: skip
    assert names == {f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block}
    members = {m for g in model.groups for m in g.members}
    assert not [m for m in members if any(key in m for key in ALWAYS_BF16)]
    attn = tiny_qwen.transformer_blocks[0].attn
    weight, scale, bias = fp8.params(attn, "img_qkv_")
    fused = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    assert weight.shape == fused.shape and scale.shape == (1, fused.shape[0])
    assert torch.equal(bias, torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
    assert model.nbytes()["fp8_weights"] == sum(tiny_qwen.get_submodule(m).weight.numel() for m in members)
    for name, expected in (("sglang", {"img_mlp.net.2"}), ("vllm-omni", {"img_mlp.net.0.proj", "img_mlp.net.2"})):
        skipped = fp8.quantize(_fresh(), name).skipped
        assert set(skipped) == {f"transformer_blocks.{i}.{n}" for i in range(2) for n in expected}
    edges = fp8.quantize(_fresh(), fp8.Fp8Policy(keep_last=1))
    assert {g.index for g in edges.groups} == {0} and len(edges.skipped) == 8


def _fresh() -> torch.nn.Module:
    return open_model_folder(tiny_checkpoint_cached("qwen-image", None)).load("transformer", torch.float32, "cpu")


def test_z_image_layer_table() -> None:
    tr = open_model_folder(tiny_checkpoint_cached("z-image", "turbo")).load("transformer", torch.float32, "cpu")
    model = fp8.quantize(tr)
    stacks = {(g.stack, g.index) for g in model.groups}
    assert stacks == {("noise_refiner", 0), ("noise_refiner", 1), ("layers", 0), ("layers", 1)}
    members = {m for g in model.groups for m in g.members}
    for kept in ("context_refiner", "adaLN_modulation", "cap_embedder", "x_embedder", "t_embedder", "final_layer"):
        assert not [m for m in members if kept in m]
    assert {g.prefix for g in model.groups} == {"qkv_", "", "w13_"}


def test_unaligned_linears_stay_bf16() -> None:
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=12, num_attention_heads=2,
                                     joint_attention_dim=24, axes_dims_rope=(4, 4, 4))  # fmt: skip
    model = fp8.quantize(tr)
    assert not model.groups and all(r.startswith("unaligned") for r in model.skipped.values())


def _adapter(tr: torch.nn.Module, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(5)

    def layer(name: str, bias: bool = False) -> LoraLayer:
        lin = tr.get_submodule(name)
        up_bias = torch.randn(lin.out_features, generator=g) * 0.1 if bias else None
        down = torch.randn(rank, lin.in_features, generator=g) * 0.1
        return LoraLayer(down, torch.randn(lin.out_features, rank, generator=g) * 0.1, 0.5, up_bias)

    names = ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.img_mlp.net.0.proj",
             "transformer_blocks.0.img_mod.1")  # fmt: skip
    return Adapter("test", {n: layer(n, bias=n.endswith("proj")) for n in names})


def _snapshot(model: fp8.Fp8Model) -> dict:
    return {g.name: [None if t is None else t.clone() for t in fp8.params(model.owner(g), g.prefix)]
            for g in model.groups}  # fmt: skip


@pytest.mark.parametrize("release", [False, True])
def test_lora_merges_in_high_precision_and_restores_exactly(release: bool) -> None:
    tr = _fresh()
    model = fp8.quantize(tr)
    masters = {m: tr.get_submodule(m).weight.detach().clone() for g in model.groups for m in g.members}
    if release:
        model.release_master()
        assert tr.transformer_blocks[0].attn.to_k.weight.numel() == 0
    base = _snapshot(model)
    adapter = _adapter(tr)
    slot = fp8.Fp8AdapterSlot(model)
    mine, rest = slot.split([(adapter, 0.7)])
    assert set(rest[0][0]) == {"transformer_blocks.0.img_mod.1"}  # the bf16 slot's share
    img_mod = tr.transformer_blocks[0].img_mod[1].weight.detach().clone()
    slot.use("a", [(adapter, 0.7)])

    group, lo, hi = model.locate("transformer_blocks.0.attn.to_k")
    weight, scale, _ = fp8.params(model.owner(group), group.prefix)
    layer = adapter.layers["transformer_blocks.0.attn.to_k"]
    start = masters["transformer_blocks.0.attn.to_k"]
    if release:  # the base is what the FP8 rows hold
        start = fp8.dequantize_rows(base[group.name][0][lo:hi], base[group.name][1][:, lo:hi].reshape(-1, 1))
    expected_q, expected_s = fp8.quantize_rows(start.clone().addmm_(layer.up, layer.down, alpha=0.7 * 0.5))
    assert torch.equal(weight[lo:hi].float(), expected_q.float())
    assert torch.equal(scale[:, lo:hi], expected_s.reshape(1, -1))
    assert not torch.equal(scale[:, lo:hi], base[group.name][1][:, lo:hi])  # the merge did change these rows
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[lo:hi] = False  # to_q and to_v rows of the fused QKV: not re-quantized
    assert torch.equal(weight[untouched].float(), base[group.name][0][untouched].float())
    proj, plo, phi = model.locate("transformer_blocks.1.img_mlp.net.0.proj")
    bias = fp8.params(model.owner(proj), proj.prefix)[2]
    proj_layer = adapter.layers["transformer_blocks.1.img_mlp.net.0.proj"]
    torch.testing.assert_close(bias, base[proj.name][2] + 0.35 * proj_layer.up_bias, rtol=0, atol=1e-6)
    assert torch.equal(tr.transformer_blocks[0].img_mod[1].weight, img_mod)  # not this slot's module

    slot.use("a", [(adapter, 0.7)])  # same key: nothing merged twice
    assert torch.equal(weight[lo:hi].float(), expected_q.float())
    slot.use((), [])  # a job without adapters: the base weights back
    after = _snapshot(model)
    for name, tensors in base.items():
        for a, b in zip(tensors, after[name], strict=True):
            assert (a is None and b is None) or torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    if not release:
        assert all(torch.equal(tr.get_submodule(m).weight, w) for m, w in masters.items())
