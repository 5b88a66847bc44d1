"""`bench/fast_variants_gpu.py --smoke`: the GPU variant benchmark's own code on the CPU with the tiny checkpoints
(float32; Triton kernels as their fallbacks, FP8 emulated), so that it cannot rot between device runs."""

from __future__ import annotations

import json

from bench import fast_variants_gpu


def test_variant_benchmark_smoke(tmp_path, capsys) -> None:
    assert fast_variants_gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "fast_variants.json").read_text())
    records = report["records"]
    assert not [r for r in records if "error" in r or "skipped" in r]
    forwards = {(r["workload"], r["variant"]): r for r in records if r["kind"] == "forward"}
    for work in ("qwen-image-64", "z-image-turbo-64", "qwen-image-128"):
        assert (work, "today") in forwards and (work, "best bf16") in forwards
        # The fallbacks compute today's maths: any bf16 arrangement is today's forward to float32 rounding.
        assert forwards[(work, "best bf16")]["cosine"] > 0.99999
    policies = {v for w, v in forwards if w == "qwen-image-64" and v.startswith("fp8")}
    assert policies == {"fp8 blocks", "fp8 sglang", "fp8 vllm-omni", "fp8 edges"}
    for (work, variant), r in forwards.items():
        if variant in ("fp8 blocks", "fp8 sglang"):  # emulated FP8 on the tiny DiTs: close, not equal
            assert 0.99 < r["cosine"] < 1.0 and r["traj_cosine"] > 0.99, (work, variant)
    stages = [r for r in records if r["kind"] == "stage"]
    assert {r["stage"] for r in stages} == {"pre", "post"} and all(r["cosine"] > 0.99 for r in stages if "cosine" in r)
    assert {"per_row_ms", "one_call_ms"} <= set(next(r for r in records if r["kind"] == "attention"))
    memory = [r for r in records if r["kind"] == "memory"]
    assert any(r.get("fp8_gib", 0) > 0 for r in memory) and any(r.get("freed_gib", 0) > 0 for r in memory)
    assert len(report["profiles"]) == 6
    assert "| workload | variant |" in capsys.readouterr().out
