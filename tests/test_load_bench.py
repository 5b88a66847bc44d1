"""`bench/load_gpu.py`, the GPU load test: its own code on the CPU with the tiny checkpoints (`--smoke`), and its
verdict shown to fail on a failed request, an image that differs from its one-request result, a first request
of a cold size much slower than its warm self, and SDPA switches that changed during the load."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import load_gpu

ROOT = Path(__file__).resolve().parents[1]


def test_load_benchmark_smoke() -> None:
    """`serve all` in this process with both transports, two callers, generate and edit, a warm and a cold size,
    both kernel paths: no failure, every image equal to the same request run alone."""
    proc = subprocess.run(
        [sys.executable, "bench/load_gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for phase in load_gpu.SMOKE_PHASES.split(","):
        assert f"VERDICT {phase}: PASS" in lines, proc.stdout[-3000:]
        load = next(line for line in lines if line.startswith(f"LOAD {phase}:"))
        assert "4 requests (1 HTTP) from 2 callers, 4 succeeded, 0 failed" in load, load
        assert "SDPA switches changed: False" in load
        images = next(line for line in lines if line.startswith(f"IMAGES {phase}:"))
        assert "4 compared with the same request alone, 4 bitwise equal" in images, images
    assert "VERDICT kernels-equal-sdpa: PASS" in lines and lines[-1] == "ALL PASSED"


def _result(phase: load_gpu.Phase) -> dict:
    """A load of `phase` that went well: every request answered with its one-request image, warm repeats."""
    outcomes = []
    for request in load_gpu.plan(phase):
        first = request.index < 2
        outcome = load_gpu.Outcome(request, started_at=float(request.index), latency_s=1.0)
        outcome.queued_at, outcome.denoising_at = request.index + 0.2, request.index + 0.5
        outcome.work_s = 1.2 if first else 1.0
        outcome.image = np.full((4, 4, 3), request.distinct / 10, dtype=np.float32)
        outcomes.append(outcome)
    alone = {o.request.distinct: dataclasses.replace(o) for o in outcomes[:2]}
    switches = (True, True, True, True)
    return dict(ready_s=1.0, wall_s=8.0, outcomes=outcomes, alone=alone, switches={switches},
                initial_switches=switches, callers=2)  # fmt: skip


def test_load_verdict_can_fail(capsys) -> None:
    phase = dataclasses.replace(load_gpu.PHASES["qwen-image-fast"].smoke(), repeats=3)
    assert load_gpu.summarise("ok", phase, _result(phase), 0, check_first=True)["verdict"] == "pass"
    broken = _result(phase)
    broken["outcomes"][3].error = "gRPC INTERNAL: No available kernel"
    assert "1 + 0 (alone) failed" in load_gpu.summarise("failed", phase, broken, 0, True)["verdict"]
    broken = _result(phase)
    broken["outcomes"][4].image = broken["outcomes"][4].image + 0.05
    assert "min PSNR" in load_gpu.summarise("image", phase, broken, 0, True)["verdict"]
    broken = _result(phase)
    broken["outcomes"][1].work_s = 2.0  # the first 48x80 request: 2x its warm repeats
    assert "first 48x80 request: 2.00x" in load_gpu.summarise("slow", phase, broken, 0, True)["verdict"]
    assert load_gpu.summarise("cpu", phase, broken, 0, False)["verdict"] == "pass"
    broken = _result(phase)
    broken["switches"].add((False, False, False, True))
    assert "SDPA switches changed" in load_gpu.summarise("switches", phase, broken, 0, True)["verdict"]
    assert "VERDICT slow: FAIL" in capsys.readouterr().out
