"""Kernel ceilings and candidates at the DiT shapes, on one GPU: one JSON line per measurement.

What it answers before the fast path is designed around it:
* attention: each SDPA kernel (cuDNN, flash, memory-efficient) at Qwen-Image / Z-Image shapes, exact and
  text-padded lengths, and the ways to mask padded keys with static shapes (cuDNN bias, efficient + bool mask,
  varlen with dummy pad sequences), each checked against the unpadded math;
* whether each candidate traces under `torch.compile(fullgraph=True)` and replays in a CUDA graph;
* bf16 matmul rate at the block shapes (M = tokens), and VAE decode time with and without channels-last.

    python bench/kernel_probe.py [--quick]
"""

# ruff: noqa: B023  (every lambda below is timed in the iteration that makes it)
from __future__ import annotations

import argparse
import json
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def bench_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def qkv(batch: int, seq: int, heads: int, dim: int = 128):
    """[B, H, S, D] views of [B, S, H, D] storage, as the processors hand them to SDPA."""
    make = lambda: torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # noqa: E731
    return make(), make(), make()


def attention_flops(batch: int, sq: int, sk: int, heads: int, dim: int = 128) -> float:
    return 4.0 * batch * heads * sq * sk * dim


def dense(backend: SDPBackend):
    def run(q, k, v, mask=None):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


def cudnn_bias(q, k, v, bias):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False)[0]


def probe_attention(quick: bool) -> None:
    # (name, batch, image tokens, text tokens real, heads)
    cases = [
        ("qwen1024-L40", 1, 4096, 40, 24),
        ("qwen1024-L48", 1, 4096, 48, 24),
        ("qwen1024-L64", 1, 4096, 64, 24),
        ("qwen1024-L77", 2, 4096, 77, 24),
        ("qwen1024-L128", 2, 4096, 128, 24),
        ("zimage1024-L128", 1, 4096, 128, 30),
        ("zimage1024-L128-B2", 2, 4096, 128, 30),
        ("qwen-edit-L250", 2, 8192, 250, 24),
        ("qwen2048-L64", 2, 16384, 64, 24),
    ]
    if quick:
        cases = cases[:2]
    for name, batch, image, text, heads in cases:
        seq = image + text
        q, k, v = qkv(batch, seq, heads)
        flops = attention_flops(batch, seq, seq, heads)
        ref = None
        for label, backend in (
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            try:
                fn = dense(backend)
                out = fn(q, k, v)
                ref = out if ref is None else ref
                ms = bench_ms(lambda fn=fn: fn(q, k, v))
                emit(probe="attn", case=name, kernel=label, ms=ms, tflops=flops / ms / 1e9, err=rel(out, ref))
            except Exception as exc:  # noqa: BLE001 - a probe reports every failure and goes on
                emit(probe="attn", case=name, kernel=label, error=str(exc)[:300])

        # Padded to a multiple of 64 text rows, keys [image, text] with a runtime valid length per batch row.
        padded = image + text + (-text) % 64
        qp, kp, vp = qkv(batch, padded, heads)
        for t in (qp, kp, vp):
            t[:, :, seq:] = 7.0  # garbage in the pad rows: must not leak into real rows
        valid = torch.full((batch,), seq, device="cuda")
        keep = torch.arange(padded, device="cuda")[None, :] < valid[:, None]
        exact = dense(SDPBackend.CUDNN_ATTENTION)(qp[:, :, :seq], kp[:, :, :seq], vp[:, :, :seq])
        bias = torch.zeros(batch, 1, 1, padded, device="cuda", dtype=torch.bfloat16)
        bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
        bool_mask = keep[:, None, None, :]
        flops_p = attention_flops(batch, padded, padded, heads)
        variants = {
            "cudnn+bias": lambda: cudnn_bias(qp, kp, vp, bias.expand(batch, heads, padded, padded)),
            "cudnn+bias-bcast": lambda: cudnn_bias(qp, kp, vp, bias),
            "efficient+boolmask": lambda: dense(SDPBackend.EFFICIENT_ATTENTION)(qp, kp, vp, bool_mask),
            "cudnn+boolmask(sdpa)": lambda: dense(SDPBackend.CUDNN_ATTENTION)(qp, kp, vp, bool_mask),
            "cudnn-padded-nomask": lambda: dense(SDPBackend.CUDNN_ATTENTION)(qp, kp, vp),
        }
        varlen = varlen_call(qp, kp, vp, seq, padded)
        if varlen is not None:
            variants.update(varlen)
        for label, fn in variants.items():
            try:
                out = fn()
                err = rel(out[:, :, :seq], exact) if label != "cudnn-padded-nomask" else None
                ms = bench_ms(fn)
                emit(
                    probe="attn-padded",
                    case=name,
                    kernel=label,
                    padded=padded,
                    ms=ms,
                    tflops=flops_p / ms / 1e9,
                    err=err,
                )
            except Exception as exc:  # noqa: BLE001
                emit(probe="attn-padded", case=name, kernel=label, error=str(exc)[:300])


def varlen_call(qp, kp, vp, seq: int, padded: int):
    """Packed varlen with a dummy pad sequence after every real one, so shapes stay static."""
    batch, heads, _, dim = qp.shape
    pack = lambda t: t.transpose(1, 2).reshape(batch * padded, heads, dim)  # noqa: E731
    q, k, v = pack(qp), pack(kp), pack(vp)
    bounds = []
    for b in range(batch):
        bounds += [b * padded, b * padded + seq]
    cu = torch.tensor([*bounds, batch * padded], device="cuda", dtype=torch.int32)

    def unpack(out):
        return out.reshape(batch, padded, heads, dim).transpose(1, 2)

    calls = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        calls["varlen_attn"] = lambda: unpack(varlen_attn(q, k, v, cu, cu, padded, padded))
    except Exception as exc:  # noqa: BLE001
        emit(probe="attn-padded", kernel="varlen_attn", error=f"import: {exc}"[:300])
    if hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        calls["cudnn-varlen"] = lambda: unpack(
            torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, padded, padded, False, 0.0, False, False)[0]
        )
    calls["flash-varlen"] = lambda: unpack(
        torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, padded, padded, 0.0, False, False)[0]
    )
    return calls


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def probe_compile() -> None:
    """Each candidate under compile(fullgraph) and inside a CUDA graph."""
    q, k, v = qkv(2, 4096 + 64, 24)
    valid = torch.full((2,), 4096 + 40, device="cuda")
    bias = torch.where(torch.arange(4160, device="cuda")[None] < valid[:, None], 0.0, float("-inf"))
    bias = bias.to(torch.bfloat16)[:, None, None, :]

    def with_kernel(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v) * 2

    def direct(q, k, v):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0] * 2

    def biased(q, k, v):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False)[0] * 2

    for name, fn in (("sdpa_kernel-ctx", with_kernel), ("aten-cudnn", direct), ("aten-cudnn-bias", biased)):
        try:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            out = compiled(q, k, v)
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                compiled(q, k, v)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                static = compiled(q, k, v)
            graph.replay()
            torch.cuda.synchronize()
            emit(probe="compile", fn=name, ok=True, err=rel(static, out))
        except Exception:  # noqa: BLE001
            emit(probe="compile", fn=name, ok=False, error=traceback.format_exc(limit=2)[-400:])


def probe_matmul() -> None:
    for m in (4096, 4136, 4144, 4160, 8192, 8320):
        for k_dim, n in ((3072, 3072), (3072, 12288), (12288, 3072), (3840, 10240)):
            a = torch.randn(m, k_dim, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k_dim, device="cuda", dtype=torch.bfloat16)
            ms = bench_ms(lambda a=a, w=w: F.linear(a, w))
            emit(probe="mm", m=m, k=k_dim, n=n, ms=ms, tflops=2 * m * k_dim * n / ms / 1e9)


def probe_vae() -> None:
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    from bench.e2e_gpu import FLUX_VAE

    torch.manual_seed(0)
    for name, build, latent in (
        ("flux-vae", lambda: AutoencoderKL(**FLUX_VAE), (1, 16, 128, 128)),
        ("qwen-vae", lambda: AutoencoderKLQwenImage(), (1, 16, 1, 128, 128)),
    ):
        vae = build().to("cuda", torch.bfloat16).eval()
        z = torch.randn(latent, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = vae.decode(z, return_dict=False)[0]
            emit(probe="vae", vae=name, mode="default", ms=bench_ms(lambda: vae.decode(z), iters=5, warmup=1))
            torch.backends.cudnn.benchmark = True
            emit(
                probe="vae",
                vae=name,
                mode="cudnn.benchmark",
                ms=bench_ms(lambda: vae.decode(z), iters=5, warmup=2),
                err=rel(vae.decode(z, return_dict=False)[0], ref),
            )
            if len(latent) == 4:
                vae_cl = vae.to(memory_format=torch.channels_last)
                z_cl = z.to(memory_format=torch.channels_last)
                emit(
                    probe="vae",
                    vae=name,
                    mode="channels_last+benchmark",
                    ms=bench_ms(lambda: vae_cl.decode(z_cl), iters=5, warmup=2),
                    err=rel(vae_cl.decode(z_cl, return_dict=False)[0], ref),
                )
            torch.backends.cudnn.benchmark = False
        vae = vae_cl = None
        torch.cuda.empty_cache()


def probe_blocks() -> None:
    """Our DiT forwards over a few full-width blocks: eager vs each block compiled (fullgraph, static shapes)."""
    import time

    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    from imagegen.common.attention import LOCAL_ATTENTION, AttentionLayout
    from imagegen.common.families.qwen_image.dit import QwenDiT, qwen_rotary
    from imagegen.common.families.z_image.dit import ImageSlots, ZImageDiT
    from imagegen.common.sharding import SequencePlan

    torch.set_grad_enabled(False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        qwen = QwenImageTransformer2DModel(num_layers=6).eval()
        zimg = ZImageTransformer2DModel(n_layers=4, n_refiner_layers=2).eval()
    torch.set_default_dtype(previous)

    dit = QwenDiT(qwen)
    x = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 64, 3584, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16)
    image_rotary, text_rotary = qwen_rotary(qwen, [(1, 64, 64)], 64)
    layout = AttentionLayout(LOCAL_ATTENTION, image_rotary.to("cuda"), text_rotary.to("cuda"))
    zdit = ZImageDiT(zimg)
    slots = ImageSlots(SequencePlan((4096,)), 4096, torch.device("cuda"))
    caption = torch.randn(100, 2560, device="cuda", dtype=torch.bfloat16)
    branch = zdit.branch(caption, 64, 64, slots)
    tokens = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    zt = torch.full((1,), 0.5, device="cuda")
    cases = {
        "qwen-6blocks": (lambda: dit(x, text, t, layout), qwen.transformer_blocks),
        "zimage-4layers": (lambda: zdit(tokens, zt, branch, slots, LOCAL_ATTENTION), zimg.layers),
    }
    for name, (call, blocks) in cases.items():
        ref = call()
        eager = bench_ms(call, iters=10)
        try:
            start = time.perf_counter()
            for block in blocks:
                block.compile(fullgraph=True, dynamic=False)
            out = call()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            compiled = bench_ms(call, iters=10)
            a, b = out.double().flatten(), ref.double().flatten()
            cos = (a @ b / (a.norm() * b.norm())).item()
            emit(probe="blocks", case=name, eager_ms=eager, compiled_ms=compiled, compile_s=compile_s, cosine=cos)
        except Exception:  # noqa: BLE001
            emit(probe="blocks", case=name, eager_ms=eager, error=traceback.format_exc(limit=4)[-1500:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    emit(
        probe="env",
        torch=torch.__version__,
        cudnn=torch.backends.cudnn.version(),
        card=torch.cuda.get_device_name(),
        attention=[n for n in dir(torch.nn.attention) if not n.startswith("__")],
        has_cudnn_forward=hasattr(torch.ops.aten, "_cudnn_attention_forward"),
    )
    for probe in (probe_attention, probe_compile, probe_blocks, probe_matmul, probe_vae):
        try:
            probe(args.quick) if probe is probe_attention else probe()
        except Exception:  # noqa: BLE001
            emit(probe=probe.__name__, error=traceback.format_exc(limit=3)[-600:])


if __name__ == "__main__":
    main()
