"""The candidate fused kernels (`imagegen.common.fused_ops`) as the CPU can check them: their fallbacks equal the
unfused maths of today's fast path (<= 1e-5 in float32, on the tiny checkpoints' own blocks), the Triton
kernels equal the fallbacks under Triton's interpreter, and the benchmark's variant stages (fused kernels and
FP8) trace whole under dynamo with one graph for every prompt length."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from bench import fast_variants_gpu as variants
from imagegen.common import fp8, fused_ops
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.families.qwen_image import dit_fast as qwen_fast
from imagegen.common.families.z_image import dit_fast as z_fast
from imagegen.common.kernels import batch_dynamic, mark_dynamic
from imagegen.common.tiny import tiny_checkpoint_cached

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


def load(family: str, variant: str | None) -> torch.nn.Module:
    return open_model_folder(tiny_checkpoint_cached(family, variant)).load("transformer", torch.float32, "cpu")


@pytest.fixture(scope="module")
def qwen() -> qwen_fast.QwenFastDiT:
    return qwen_fast.QwenFastDiT(load("qwen-image", None))


@pytest.fixture(scope="module")
def zimg() -> z_fast.ZImageFastDiT:
    return z_fast.ZImageFastDiT(load("z-image", "turbo"))


def qwen_args(block, text_len: int, seed: int = 0) -> tuple[tuple, tuple]:
    """Block-stage inputs of the tiny Qwen DiT (dim 64, 4 heads of 16): two CFG rows, 16 image tokens."""
    g = torch.Generator().manual_seed(seed)
    dim, heads = 64, block.attn.heads
    half = dim // heads // 2
    angles_i, angles_t = torch.rand(16, half, generator=g) * 6, torch.rand(text_len, half, generator=g) * 6
    pre = (torch.randn(2, 16, dim, generator=g), torch.randn(2, text_len, dim, generator=g),
           torch.randn(1, 3 * dim, generator=g) * 0.3, torch.randn(1, 3 * dim, generator=g) * 0.3, None,
           angles_i.cos(), angles_i.sin(), angles_t.cos(), angles_t.sin())  # fmt: skip
    return pre, (torch.randn(1, 3 * dim, generator=g) * 0.3, torch.randn(1, 3 * dim, generator=g) * 0.3)


def run_qwen(stages, block, pre_args, mods2):
    pre, post = stages
    q, k, v, g1, g2 = pre(block, *pre_args)
    joint = batch_dynamic((q + k + v) / 3, 1)  # a stand-in attention output of the joint layout
    hidden, text = post(block, pre_args[0], pre_args[1], joint, g1, g2, *mods2, None)
    return (q, k, v, g1, g2, hidden, text)


FUSED = variants.Recipe(pre_norm="triton", qk="triton", post_norm="triton")


@pytest.mark.parametrize("recipe", [FUSED, variants.Recipe(qk="slice"), variants.Recipe(qk="flip")],
                         ids=["triton-fallbacks", "slice", "flip"])  # fmt: skip
def test_qwen_variant_stages_equal_todays(qwen, recipe) -> None:
    block = qwen.transformer.transformer_blocks[0]
    pre_args, mods2 = qwen_args(block, 7)
    today = run_qwen((qwen_fast._block_pre, qwen_fast._block_post), block, pre_args, mods2)
    fused = run_qwen(variants.qwen_stages(recipe), block, pre_args, mods2)
    for a, b in zip(fused, today, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_qwen_fused_ops_trap(qwen, monkeypatch) -> None:
    """The comparison above fails when the fused maths is wrong (sine sign of the rotation flipped)."""
    block = qwen.transformer.transformer_blocks[0]
    pre_args, mods2 = qwen_args(block, 7)
    today = run_qwen((qwen_fast._block_pre, qwen_fast._block_post), block, pre_args, mods2)
    real = fused_ops._heads_reference
    monkeypatch.setattr(fused_ops, "_heads_reference", lambda qkv, h, wq, wk, c, s, e: real(qkv, h, wq, wk, c, -s, e))
    fused = run_qwen(variants.qwen_stages(FUSED), block, pre_args, mods2)
    assert (fused[0] - today[0]).abs().max() > 1e-2


def z_args(layer, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    dim, heads = 96, layer.attention.heads
    angles = torch.rand(1, 48, dim // heads // 2, generator=g) * 6
    return (torch.randn(1, 48, dim, generator=g), torch.randn(1, 96, generator=g), angles.cos(), angles.sin())


@pytest.mark.parametrize("recipe", [FUSED, variants.Recipe(qk="flip")], ids=["triton-fallbacks", "flip"])
def test_z_image_variant_stages_equal_todays(zimg, recipe) -> None:
    layer = zimg.transformer.layers[0]
    args = z_args(layer)
    outs = []
    for pre, post in ((z_fast._layer_pre, z_fast._layer_post), variants.z_stages(recipe)):
        q, k, v, *mods = pre(layer, *args)
        outs.append((q, k, v, *mods, post(layer, args[0], (q + k + v) / 3, *mods)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_fp8_outputs_quantize_the_fallback() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 9, 48, generator=g), torch.randn(2, 9, 48, generator=g)
    gate, mul, add = torch.randn(1, 1, 48, generator=g), 1 + torch.randn(1, 1, 48, generator=g) * 0.1, None
    weight = torch.rand(48, generator=g) + 0.5
    res, q, s = fused_ops.residual_norm_modulate_fp8(x, y, gate, weight, 1e-5, mul, add, weight, 1e-6, True)
    ref_res, ref_out = fused_ops.residual_norm_modulate(x, y, gate, weight, 1e-5, mul, add, weight, 1e-6, True)
    assert q.shape == (32, 48) and s.shape == (32, 1) and torch.equal(res, ref_res)  # 18 rows padded to 32
    rq, rs = fp8.quantize_rows(ref_out.reshape(-1, 48))
    assert torch.equal(q[:18].float(), rq.float()) and torch.equal(s[:18], rs)
    assert torch.equal(q[18:].float(), torch.zeros(14, 48))


INTERPRETED = textwrap.dedent(
    """
    import torch
    from imagegen.common import fused_ops as fo
    assert fo.INTERPRET and fo.use_triton(torch.zeros(1))
    g = torch.Generator().manual_seed(0)

    def close(a, b, tol=1e-5):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()
        assert err <= tol, err
        return err

    for dim, rms in ((96, False), (96, True), (40, True)):  # dims that are not powers of two: masked lanes
        x, y = torch.randn(2, 7, dim, generator=g), torch.randn(2, 7, dim, generator=g)
        gate, mul, add = (torch.randn(1, 1, dim, generator=g) for _ in range(3))
        per_token = torch.randn(1, 7, dim, generator=g)  # modulation that differs per token (zero_cond_t)
        w = torch.rand(dim, generator=g) + 0.5 if rms else None
        yw = torch.rand(dim, generator=g) + 0.5
        ref = fo._modulated(x, per_token, add, w, 1e-6, rms)
        close(fo._launch_norm(x, None, None, None, 0.0, per_token, add, w, 1e-6, rms, False)[1], ref)
        r = fo._residual(x, y, gate, yw, 1e-5)
        res, out = fo._launch_norm(x, y, gate, yw, 1e-5, mul, None, w, 1e-6, rms, False)
        close(res, r)
        close(out, fo._modulated(r, mul, None, w, 1e-6, rms))
        res, q, s = fo._launch_norm(x, y, gate, yw, 1e-5, mul, None, w, 1e-6, rms, True)
        rq, rs = fo._quantized(fo._modulated(r, mul, None, w, 1e-6, rms))
        close(s, rs)
        close(q.float() * s, rq.float() * rs, 1e-3)  # a tie may round the other way in one element
        assert q.shape == (16, dim) and bool((q[14:].float() == 0).all())

    for heads, dim in ((4, 16), (3, 24)):  # 3 heads, head dim 24: both masked
        segs = [torch.randn(2, n, 3 * heads * dim, generator=g) for n in (13, 5)]
        ws = [torch.rand(dim, generator=g) + 0.5 for _ in range(4)]
        angles = [torch.rand(13, dim // 2, generator=g) * 6, torch.rand(2, 5, dim // 2, generator=g) * 6]
        coss, sins = [a.cos() for a in angles], [a.sin() for a in angles]
        got = fo._launch_rope(segs, ws, coss, sins, heads, 1e-6, True)
        parts = [fo._heads_reference(t, heads, ws[2 * i], ws[2 * i + 1], coss[i], sins[i], 1e-6)
                 for i, t in enumerate(segs)]
        for j in range(3):
            close(got[j], torch.cat([p[j] for p in parts], dim=1))
        wrong = fo._launch_rope(segs, ws, coss, [-s for s in sins], heads, 1e-6, True)
        try:
            close(wrong[0], torch.cat([p[0] for p in parts], dim=1))
        except AssertionError:
            pass
        else:
            raise SystemExit("trap: a wrong rotation passed the check")
        q, k = fo.qk_norm_rope(segs[1], ws[0], ws[1], coss[1], sins[1], heads, 1e-5)
        rq, rk, _ = fo._heads_reference(segs[1], heads, ws[0], ws[1], coss[1], sins[1], 1e-5)
        close(q, rq)
        close(k, rk)
    print("interpreted kernels ok")
    """
)


def test_triton_kernels_under_the_interpreter() -> None:
    """Each Triton kernel against its fallback in float32 on CPU tensors (`TRITON_INTERPRET=1`; the
    interpreter's bf16 casts truncate, so bf16 is left to the GPU probe of bench/fast_variants_gpu.py)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted kernels ok" in done.stdout


def test_variant_stages_trace_whole_and_once(monkeypatch) -> None:
    """The fused-kernel and FP8 stages compile whole (custom ops through their fake kernels, FP8 row padding
    with a symbolic text length), and a second prompt length compiles nothing new."""
    monkeypatch.setenv("IMAGEGEN_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    dit = qwen_fast.QwenFastDiT(load("qwen-image", None))
    fp8.quantize(dit.transformer, "sglang")
    recipe = variants.Recipe(pre_norm="triton", qk="triton", post_norm="triton", fp8=True, fp8_norm=True)
    stages = variants.BlockStages(*variants.qwen_stages(recipe))(True)
    block = dit.transformer.transformer_blocks[0]
    results = []
    for text_len in (7, 11):
        pre_args, mods2 = qwen_args(block, text_len, seed=text_len)
        for t in (pre_args[0], pre_args[1]):
            batch_dynamic(t, 1)
        for t in pre_args[7:9]:
            mark_dynamic(t, 0)
        eager = run_qwen(variants.qwen_stages(recipe), block, pre_args, mods2)
        results.append((run_qwen(stages, block, pre_args, mods2), eager))
        graphs = counters["stats"]["unique_graphs"]
        if text_len == 7:
            first = graphs
    assert first >= 2 and counters["stats"]["unique_graphs"] == first
    for compiled_out, eager_out in results:
        for a, b in zip(compiled_out, eager_out, strict=True):
            torch.testing.assert_close(a, b, **TOL)
