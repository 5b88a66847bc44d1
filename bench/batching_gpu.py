"""Batching throughput through the denoiser service: `--max-batch 1` against batched, in the same run.

Each workload hosts a full-size random-weight DiT (`bench/e2e_gpu.py`'s published configs, bf16 on the GPU)
in the real `DenoiserServicer` behind a real gRPC server on 127.0.0.1, once with `--max-batch 1` (the
baseline) and once with `--max-batch N`, both on the same stage object (the fast path, compiled and warmed up
by the servicer as in production). `--callers` concurrent clients send `Denoise` RPCs with inline embeddings
of different lengths, seeds and guidance scales: an untimed round first (compiles and captures for new
shapes), then `--requests` timed ones. Printed per workload: requests/s and p50/p90 latency of both, the
speed-up, and the fidelity of batched requests against the same requests run alone (the baseline): final
image PSNR through the family's full-size VAE (bf16) and max |diff|. JSON lines on stdout, a summary table,
and `$OUT/batching.json` when `$OUT` is set.

    python bench/batching_gpu.py [--workloads qwen-image-512,z-image-turbo-512,z-image-turbo-1024]
        [--callers 8] [--requests 16] [--warm 8] [--max-batch 8] [--batch-wait-ms 10] [--compile on]
    python bench/batching_gpu.py --smoke   # the same code on the CPU with the tiny checkpoints (CI runs it)

The encoder and VAE services are left out on purpose: batching is the denoiser's, and their time would only
dilute the comparison (the `serve all` figures in docs/benchmarks.md have them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from bench.compare import psnr
from imagegen.cli import build_parser
from imagegen.common.checkpoint import open_model_folder
from imagegen.common.families import get_family
from imagegen.common.images import to_float_array
from imagegen.common.kernels import configure_compiler
from imagegen.common.options import ResolvedOptions
from imagegen.common.serving import metrics
from imagegen.common.serving.convert import resolved_to_proto
from imagegen.common.serving.embeddings import TENSOR_NAME
from imagegen.common.serving.hosting import HostedModel
from imagegen.common.stage_settings import StageSettings
from imagegen.common.tiny import tiny_checkpoint_cached
from imagegen.common.wire import LATENTS, pack, unpack
from imagegen.services.denoiser import DenoiserServicer
from imagegen.services.denoiser_config import DenoiserConfig
from imagegen.v1 import denoiser_pb2, denoiser_pb2_grpc, encoder_pb2

MESSAGE_BYTES = 256 << 20
# Prompt and negative embedding lengths the requests cycle through (text-to-image embeddings run ~10-300).
PROMPT_LENGTHS = (24, 57, 90, 131, 33, 75, 160, 45, 210, 12)
NEGATIVE_LENGTHS = (11, 40, 7, 66, 19)


@dataclass(frozen=True)
class Workload:
    family: str
    variant: str | None  # which tiny checkpoint lends the scheduler config (Turbo's static shift)
    size: int
    steps: int
    cfg: bool
    min_speedup: float | None = None  # issue 10's targets: requests/s against --max-batch 1
    max_p50_ratio: float | None = None  # ... or p50 latency no worse than unbatched (within 5%)


WORKLOADS = {
    "qwen-image-512": Workload("qwen-image", None, 512, 20, True, min_speedup=1.8),
    "z-image-turbo-512": Workload("z-image", "turbo", 512, 8, False, min_speedup=2.0),
    "z-image-turbo-1024": Workload("z-image", "turbo", 1024, 8, False, max_p50_ratio=1.05),
    "qwen-image-1024": Workload("qwen-image", None, 1024, 20, True, max_p50_ratio=1.05),
    "z-image-cfg-512": Workload("z-image", None, 512, 20, True),
}
MIN_PSNR_DB = 40.0  # GPU bf16: a batched request against the same request alone
SMOKE_TOLERANCE = 1e-6  # CPU float32: the exactness contract
DEFAULT_WORKLOADS = "qwen-image-512,z-image-turbo-512,z-image-turbo-1024"
SMOKE_SIZE, SMOKE_STEPS = 64, 3


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the stages
def build_stages(workload: Workload, smoke: bool, compile: str):
    """(denoise stage, VAE wrapper, tiny folder): full-size random weights on the GPU, or the tiny
    checkpoint's own modules on the CPU (`--smoke`)."""
    family = get_family(workload.family)
    folder = open_model_folder(tiny_checkpoint_cached(workload.family, workload.variant))
    if smoke:
        stage = family.denoiser(folder, torch.float32, "cpu", StageSettings(kernels="fast", compile="off"))
        return stage, family.vae(folder, torch.float32, "cpu"), folder
    from bench.e2e_gpu import full_size_transformer, full_size_vae

    transformer = full_size_transformer(workload.family)
    settings = StageSettings(kernels="fast", compile=compile)
    stage = family.denoiser.from_transformer(transformer, folder.scheduler_config(), settings)
    return stage, family.vae_from_module(full_size_vae(workload.family)), folder


def service_args(folder, workload: Workload, max_batch: int, wait_ms: float, smoke: bool, compile: str):
    """The denoiser's own flags (`imagegen serve denoiser ...`), as production parses them."""
    argv = ["serve", "denoiser", "--model", str(folder.path), "--device", "cpu" if smoke else "cuda"]
    argv += ["--dtype", "float32" if smoke else "bfloat16", "--max-batch", str(max_batch)]
    argv += ["--batch-wait-ms", str(wait_ms), "--queue-size", "64", "--kernels", "fast", "--compile", compile]
    argv += ["--warmup-sizes", f"{workload.size}x{workload.size}", "--max-message-bytes", str(MESSAGE_BYTES)]
    return build_parser().parse_args(argv)


# -------------------------------------------------------------------------------------------- the requests
def requests(
    workload: Workload, count: int, dim: int, size: int, steps: int, dtype: torch.dtype, offset: int = 0
) -> list[denoiser_pb2.DenoiseRequest]:
    """`count` requests that differ in prompt length, negative length, seed and guidance scale; `offset`
    shifts the length cycle, so the untimed round does not pre-capture the timed round's batch shapes."""
    generator = torch.Generator().manual_seed(1234 + offset)
    out = []
    for i in range(count):
        length, negative_length = (
            PROMPT_LENGTHS[(i + offset) % len(PROMPT_LENGTHS)],
            NEGATIVE_LENGTHS[(i + offset) % len(NEGATIVE_LENGTHS)],
        )
        embeds = torch.randn(length, dim, generator=generator).to(dtype)
        negative = torch.randn(negative_length, dim, generator=generator).to(dtype)
        guidance = 3.0 + (i % 4) * 0.5 if workload.cfg else 0.0
        options = ResolvedOptions(
            workload.family, f"request {i}", " " if workload.cfg else None, size, size, steps, guidance,
            0.0, 1.0, 512, 1000 + i, 1,
        )  # fmt: skip
        request = denoiser_pb2.DenoiseRequest(
            request_id=f"bench-{i}",
            options=resolved_to_proto(options),
            prompt_embeds=encoder_pb2.Embeddings(safetensors=pack(embeds, TENSOR_NAME)),
        )
        if workload.cfg:
            request.negative_embeds.CopyFrom(encoder_pb2.Embeddings(safetensors=pack(negative, TENSOR_NAME)))
        out.append(request)
    return out


async def drive(address: str, batch: list, callers: int) -> tuple[list[bytes], list[float], float]:
    """`callers` concurrent clients work through `batch`; (latents per request, latencies, wall seconds)."""
    options = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
    results: list[bytes] = [b""] * len(batch)
    latencies: list[float] = [0.0] * len(batch)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(batch)):
        queue.put_nowait(index)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = denoiser_pb2_grpc.DenoiserServiceStub(channel)

        async def caller() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                start = time.perf_counter()
                async for event in stub.Denoise(batch[index], timeout=3600):
                    if event.WhichOneof("event") == "latents":
                        results[index] = event.latents
                latencies[index] = time.perf_counter() - start

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return results, latencies, time.perf_counter() - start


async def serve_and_drive(servicer: DenoiserServicer, rounds: list[tuple[list, int]]) -> list[tuple]:
    """Host `servicer` on a real gRPC server and run each (requests, callers) round against it."""
    await servicer.prepare()
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
    )
    denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return [await drive(f"127.0.0.1:{port}", batch, callers) for batch, callers in rounds]
    finally:
        await server.stop(None)
        await servicer.close()


# ---------------------------------------------------------------------------------------------- the figures
def histogram_sum(histogram) -> tuple[float, float]:
    """(count, sum) of an unlabelled Prometheus histogram so far."""
    samples = {s.name: s.value for family in histogram.collect() for s in family.samples}
    return samples.get(f"{histogram._name}_count", 0.0), samples.get(f"{histogram._name}_sum", 0.0)


def images(vae, blobs: list[bytes], size: int) -> list[np.ndarray]:
    return [to_float_array(vae.decode(unpack(b, LATENTS, "latents").to(vae.device), size, size)) for b in blobs]


def run_workload(name: str, workload: Workload, args: argparse.Namespace) -> dict:
    size = SMOKE_SIZE if args.smoke else workload.size
    steps = SMOKE_STEPS if args.smoke else workload.steps
    start = time.perf_counter()
    stage, vae, folder = build_stages(workload, args.smoke, args.compile)
    sync()
    built_s = time.perf_counter() - start
    config = stage.dit.transformer.config
    dim = config.get("joint_attention_dim") or config.get("cap_feat_dim")
    warm = requests(workload, args.warm, dim, size, steps, stage.dtype, offset=3)
    timed = requests(workload, args.requests, dim, size, steps, stage.dtype)
    model = HostedModel(folder, get_family(workload.family), name, stage.dtype, str(stage.device))
    figures = {}
    for label, max_batch in (("unbatched", 1), ("batched", args.max_batch)):
        service = service_args(folder, workload, max_batch, args.batch_wait_ms, args.smoke, args.compile)
        before = histogram_sum(metrics.BATCH_SIZE)
        prepare_start = time.perf_counter()
        servicer = DenoiserServicer(DenoiserConfig.from_flags(service, model), model, stage=stage)
        (_, _, warm_s), (blobs, latencies, wall) = asyncio.run(
            serve_and_drive(servicer, [(warm, args.callers), (timed, args.callers)])
        )
        after = histogram_sum(metrics.BATCH_SIZE)
        batches = after[0] - before[0]
        figures[label] = {
            "requests_per_s": len(timed) / wall,
            "p50_s": statistics.median(latencies),
            "p90_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
            "mean_batch": (after[1] - before[1]) / batches if batches else 1.0,
            "warm_round_s": warm_s,
            "prepare_s": time.perf_counter() - prepare_start - warm_s - wall,  # load-free: warm-up, server start
            "blobs": blobs,
        }
        emit(workload=name, mode=label, **{k: v for k, v in figures[label].items() if k != "blobs"})
    checked = range(min(args.check, len(timed)))
    alone = images(vae, [figures["unbatched"]["blobs"][i] for i in checked], size)
    batched = images(vae, [figures["batched"]["blobs"][i] for i in checked], size)
    result = {
        "workload": name,
        "size": size,
        "steps": steps,
        "cfg": workload.cfg,
        "callers": args.callers,
        "requests": len(timed),
        "max_batch": args.max_batch,
        "build_s": built_s,
        "speedup": figures["batched"]["requests_per_s"] / figures["unbatched"]["requests_per_s"],
        "p50_ratio": figures["batched"]["p50_s"] / figures["unbatched"]["p50_s"],
        "min_psnr_db": min(psnr(a, b) for a, b in zip(batched, alone, strict=True)),
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)),
        **{f"{label}_{k}": v for label, f in figures.items() for k, v in f.items() if k != "blobs"},
    }
    result["verdict"] = verdict(workload, result, args.smoke)
    emit(**result)
    del stage, vae
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def verdict(workload: Workload, result: dict, smoke: bool) -> str:
    """'pass' or what missed its target (on the CPU only exactness and real batches count)."""
    misses = []
    if smoke:
        if result["max_abs_diff"] > SMOKE_TOLERANCE:
            misses.append(f"max |diff| {result['max_abs_diff']:.3g}")
        if result["batched_mean_batch"] <= 1.0:
            misses.append("no batch formed")
        return "; ".join(misses) or "pass"
    if result["min_psnr_db"] < MIN_PSNR_DB:
        misses.append(f"PSNR {result['min_psnr_db']:.1f} dB")
    if workload.min_speedup is not None and result["speedup"] < workload.min_speedup:
        misses.append(f"speed-up {result['speedup']:.2f}x < {workload.min_speedup}x")
    if workload.max_p50_ratio is not None and result["p50_ratio"] > workload.max_p50_ratio:
        misses.append(f"p50 ratio {result['p50_ratio']:.3f} > {workload.max_p50_ratio}")
    return "; ".join(misses) or "pass"


def summary(results: list[dict]) -> str:
    lines = [
        "| workload | req/s 1 | req/s N | speed-up | p50 1 (s) | p50 N (s) | p50 ratio | mean batch | PSNR (dB) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['workload']} | {r['unbatched_requests_per_s']:.3f} | {r['batched_requests_per_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['unbatched_p50_s']:.2f} | {r['batched_p50_s']:.2f} | {r['p50_ratio']:.3f} | "
            f"{r['batched_mean_batch']:.2f} | {r['min_psnr_db']:.1f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="timed requests per mode")
    parser.add_argument("--warm", type=int, default=8, help="untimed requests per mode before the timed ones")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--compile", default="on", choices=["on", "off", "auto"])
    parser.add_argument("--check", type=int, default=4, help="requests whose images are compared with alone")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.compile = "off"
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        parser.error("needs a GPU (or --smoke)")
    configure_compiler()  # start-up, as `imagegen serve`
    torch.set_grad_enabled(False)
    out = os.environ.get("OUT")
    results = []
    for name in args.workloads.split(","):
        results.append(run_workload(name, WORKLOADS[name], args))
        if out:  # after each workload: a run cut short still leaves what it measured
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "batching.json").write_text(json.dumps(results, indent=2, default=str))
    print(summary(results), flush=True)
    return 0 if all(r["verdict"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
