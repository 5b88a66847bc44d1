"""GPU smoke of every path, with tiny checkpoints: CLI generate/edit for all four families on both kernel paths,
`serve all` + SDK generate and edit, 8 concurrent requests through one `serve all`, the denoiser's time to
SERVING with a cold and a warm compiler cache, and (with 2 GPUs) `--sp 2` / `--cfg-parallel` against the
one-process result. One PASS/FAIL/SKIP line per check; the exit status is the number of failures.

    bench/gpu_smoke.sh                    # on a lent GPU (installs the carried wheels, then runs this)
    python bench/gpu_smoke.py --device cpu  # the same checks on the CPU, float32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import PIL.Image
from imagegen_client.sdk import ImageClient

from bench.compare import psnr
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.service_harness import Service, free_port, service_env

FAILURES: list[str] = []
CHECKPOINTS = {
    "qwen-image": ("qwen-image", None),
    "qwen-image-edit": ("qwen-image-edit", None),
    "qwen-image-edit-plus": ("qwen-image-edit-plus", None),
    "z-image-turbo": ("z-image", "turbo"),
}


def report(status: str, name: str, detail: str = "") -> None:
    print(f"{status} {name} {detail}".rstrip(), flush=True)
    if status == "FAIL":
        FAILURES.append(name)


def check(name: str, fn) -> object:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported and the next check runs
        report("FAIL", name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"[-3000:])
        return None
    report("PASS", name, f"({time.perf_counter() - start:.1f} s) {detail or ''}")
    return detail


def cli(args: list[str], env: dict | None = None, timeout: float = 600) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args], capture_output=True, text=True, env=env or service_env(),
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"imagegen {' '.join(args[:3])} exited {proc.returncode}: {proc.stderr[-2000:]}")


class Smoke:
    def __init__(self, device: str, work: Path) -> None:
        self.device = device
        self.dtype = "bfloat16" if device == "cuda" else "float32"
        self.work = work
        self.models = {name: str(tiny_checkpoint_cached(*spec)) for name, spec in CHECKPOINTS.items()}
        rng = np.random.default_rng(3)
        self.inputs = []
        for i, (w, h) in enumerate(((96, 64), (64, 80))):
            path = work / f"input{i}.png"
            PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            self.inputs.append(str(path))
        # bf16 on random tiny weights: the two kernel paths round differently but must draw the same image
        self.min_psnr = 30.0 if device == "cuda" else 80.0

    def device_args(self) -> list[str]:
        return ["--device", self.device, "--dtype", self.dtype]

    # ------------------------------------------------------------------------------------------------ CLI
    def cli_run(self, family: str, kernels: str, out: Path, size: int = 128) -> np.ndarray:
        common = ["--model", self.models[family], "--prompt", "a red fox in the snow", "--seed", "5", "--steps", "4"]
        common += ["--width", str(size), "--height", str(size), "--kernels", kernels, "--output", str(out)]
        if family == "z-image-turbo":
            common += ["--guidance-scale", "0"]
        else:
            common += ["--negative-prompt", "blurry"]
        if family.startswith("qwen-image-edit"):
            images = self.inputs if family == "qwen-image-edit-plus" else self.inputs[:1]
            command = ["edit", *sum((["--image", p] for p in images), [])]
        else:
            command = ["generate"]
        cli([*command, *common, *self.device_args()])
        array = np.load(out)
        if not np.isfinite(array).all():
            raise AssertionError("non-finite pixels")
        return array

    def cli_paths(self, family: str) -> str:
        fast = self.cli_run(family, "fast", self.work / f"{family}-fast.npy")
        reference = self.cli_run(family, "reference", self.work / f"{family}-reference.npy")
        value = psnr(fast, reference)
        if value < self.min_psnr:
            raise AssertionError(f"fast vs reference PSNR {value:.1f} dB < {self.min_psnr}")
        return f"fast vs reference PSNR {value:.1f} dB, shape {fast.shape}"

    # ------------------------------------------------------------------------------------------- services
    def serve_all(self, family: str, extra: list[str]) -> Service:
        stages = [f"--{stage}=127.0.0.1:{free_port()}" for stage in ("encoder", "denoiser", "vae")]
        args = ["--model", self.models[family], *stages, *self.device_args(), *extra]
        return Service(f"all-{family}", "all", args, self.work)

    def services(self) -> None:
        server = self.serve_all("qwen-image", ["--warmup-sizes", "256x256"])
        try:
            start = time.perf_counter()
            check("serve-all-qwen-image-serving", lambda: server.wait_serving(timeout=600) or "")
            report("INFO", "serve-all-time-to-serving", f"{time.perf_counter() - start:.1f} s (warm-up 256x256)")
            check("sdk-generate-vs-cli", lambda: self.sdk_generate(server))
            check("concurrent-8-requests", lambda: self.concurrent(server, 8))
        finally:
            server.stop()
        edit = self.serve_all("qwen-image-edit-plus", ["--warmup-sizes", "none"])
        try:
            check("serve-all-edit-plus-serving", lambda: edit.wait_serving(timeout=600) or "")
            check("sdk-edit", lambda: self.sdk_edit(edit))
        finally:
            edit.stop()

    def sdk_generate(self, server: Service) -> str:
        options = dict(negative_prompt="blurry", width=128, height=128, steps=4, seed=5, output_format="npy")
        with ImageClient(server.address, timeout=300) as client:
            first = time.perf_counter()
            remote = client.generate("a red fox in the snow", **options).array
            first = time.perf_counter() - first
            second = time.perf_counter()
            again = client.generate("a red fox in the snow", **options).array
            second = time.perf_counter() - second
        local = np.load(self.work / "qwen-image-fast.npy")
        value = psnr(remote, local)
        if value < self.min_psnr or not np.array_equal(remote, again):
            raise AssertionError(f"service vs CLI PSNR {value:.1f} dB; repeat equal: {np.array_equal(remote, again)}")
        return f"service vs CLI PSNR {value:.1f} dB; first {first:.2f} s, second {second:.2f} s"

    def concurrent(self, server: Service, count: int) -> str:
        def one(i: int) -> np.ndarray:
            with ImageClient(server.address, timeout=300) as client:
                return client.generate(
                    f"request {i}: a lighthouse at dusk" + " with fog" * i, negative_prompt="blurry", width=256,
                    height=256, steps=8, seed=100 + i, output_format="npy",
                ).array  # fmt: skip

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = list(pool.map(one, range(count)))
        if not all(np.isfinite(r).all() and r.shape == (1, 256, 256, 3) for r in results):
            raise AssertionError("a result is malformed")
        return f"{count}/{count} succeeded in {time.perf_counter() - start:.1f} s"

    def sdk_edit(self, server: Service) -> str:
        with ImageClient(server.address, timeout=300) as client:
            result = client.edit(
                self.inputs, "put the fox on the sofa", negative_prompt=" ", steps=4, width=128, height=128, seed=2,
                output_format="npy",
            ).array  # fmt: skip
        if result.shape != (1, 128, 128, 3) or not np.isfinite(result).all():
            raise AssertionError(f"bad edit result {result.shape}")
        return f"shape {result.shape}"

    def startup(self) -> None:
        """`serve denoiser` twice on one compiler cache: the cold and the warm time to SERVING."""
        cache = self.work / "compile-cache"
        env = service_env(IMAGEGEN_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
        args = ["--model", self.models["z-image-turbo"], *self.device_args(), "--warmup-sizes", "512x512"]
        times = []
        for label in ("cold", "warm"):
            start = time.perf_counter()
            server = Service(f"denoiser-{label}", "denoiser", args, self.work, env)
            try:
                server.wait_serving(timeout=600)
                times.append(time.perf_counter() - start)
            finally:
                server.stop()
        return f"time to SERVING: cold cache {times[0]:.1f} s, warm cache {times[1]:.1f} s (z-image-turbo, 512x512)"

    # ------------------------------------------------------------------------------------------- parallel
    def parallel(self) -> None:
        import torch

        if self.device == "cuda" and torch.cuda.device_count() < 2:
            report("SKIP", "sp2-and-cfg-parallel", f"{torch.cuda.device_count()} GPU visible; needs 2")
            return
        for flag in (["--sp", "2"], ["--cfg-parallel"]):
            name = "parallel" + "".join(flag)

            def run(flag=flag, name=name) -> str:
                out = self.work / f"{name}.npy"
                common = ["--model", self.models["qwen-image"], "--prompt", "a red fox", "--negative-prompt", "x"]
                common += ["--steps", "3", "--width", "128", "--height", "128", "--seed", "5"]
                cli(["generate", *common, *self.device_args(), *flag, "--output", str(out)])
                cli(["generate", *common, *self.device_args(), "--output", str(self.work / "one.npy")])
                diff = float(np.abs(np.load(out) - np.load(self.work / "one.npy")).max())
                limit = 1e-6 if self.device == "cpu" else 0.0
                if diff > limit and self.device == "cpu":
                    raise AssertionError(f"max |diff| {diff:.3g} vs one process")
                return f"max |diff| vs one process {diff:.3g}"

            check(name, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cli,services,startup,parallel")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory(prefix="imagegen-gpu-smoke-") as tmp:
        smoke = Smoke(args.device, Path(tmp))
        if "cli" not in skip:
            for family in CHECKPOINTS:
                check(f"cli-{family}", lambda family=family: smoke.cli_paths(family))
        if "services" not in skip:
            smoke.services()
        if "startup" not in skip:
            check("denoiser-startup", smoke.startup)
        if "parallel" not in skip:
            smoke.parallel()
    print(f"{'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'ALL PASSED'}", flush=True)
    return len(FAILURES)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
