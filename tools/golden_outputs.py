"""Golden outputs for refactors that must not move numerics: every family and variant (the parity scenarios
of `tests/parity.py`), reference and fast kernels, with and without hooks, a batch of three (and one where a
member stops after a step), and LoRA sets (one, two, then none again), through `common.pipeline.Pipeline` on
the tiny checkpoints; saved once before a change, compared bitwise (`torch.equal`) after it.

    python tools/golden_outputs.py save [DIR]      # before (default DIR: /tmp/golden)
    python tools/golden_outputs.py compare [DIR]   # after: exit 1 if any tensor differs

Issue 19 (family packages, one denoise loop per family): 246 tensors, 0 differ.
"""

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imagegen.common.denoise import StepHooks
from imagegen.common.lora.tiny import make_tiny_lora
from imagegen.common.pipeline import Pipeline
from imagegen.common.tiny import tiny_checkpoint_cached
from tests.parity import CASES
from tests.test_batching import MEMBERS, SIZES


def main() -> None:
    torch.set_num_threads(1)  # CPU results depend on the thread count: one, the same before and after
    mode = sys.argv[1]
    folder = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/golden")
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, torch.Tensor] = {}
    pipes: dict = {}

    def pipe(family, variant, kernels, lora_dir=None):
        key = (family, variant, kernels, lora_dir)
        if key not in pipes:
            pipes[key] = Pipeline(tiny_checkpoint_cached(family, variant), kernels=kernels, lora_dir=lora_dir)
        return pipes[key]

    def recorder(prefix):
        def on_output(step, branch, out):
            results[f"{prefix}/out/{step}/{branch}"] = out.detach().clone().contiguous()

        return StepHooks(on_model_output=on_output)

    for kernels in ("reference", "fast"):
        for name, case in CASES.items():
            p = pipe(case.family, case.variant, kernels)
            prefix = f"{kernels}/{name}"
            images = p(case.options, case.images(), recorder(prefix))
            results[f"{prefix}/images"] = torch.from_numpy(images)
            # without hooks too (the no-hook path)
            results[f"{prefix}/images-nohook"] = torch.from_numpy(p(case.options, case.images()))
            print(prefix, flush=True)
        # batches: three members of different prompt lengths, num_images; then one that stops after step 1
        for family, members in MEMBERS.items():
            p = pipe(family, None, kernels)
            w, h = SIZES[family]
            jobs = [p.job(p.resolve(dataclasses.replace(o, width=w, height=h, steps=3))) for o in members]
            out = p.denoiser.run_batch(jobs, [recorder(f"{kernels}/batch-{family}/{i}") for i in range(len(jobs))])
            for i, r in enumerate(out):
                results[f"{kernels}/batch-{family}/{i}/latents"] = r
            done: list[int] = []
            stop = StepHooks(
                on_step=lambda s, t, done=done: done.append(s), should_stop=lambda done=done: len(done) >= 1
            )
            out = p.denoiser.run_batch(jobs, [StepHooks(), stop, StepHooks()])
            assert isinstance(out[1], BaseException)
            for i in (0, 2):
                results[f"{kernels}/batch-stop-{family}/{i}/latents"] = out[i]
            print(kernels, "batch", family, flush=True)
        # LoRA
        for family, case_name in (("qwen-image", "qwen-image-cfg"), ("z-image", "z-image-turbo")):
            case = CASES[case_name].with_options(steps=2)
            path = tiny_checkpoint_cached(case.family, case.variant)
            lora_dir = folder / "loras" / family
            if not (lora_dir / "second.safetensors").exists():
                make_tiny_lora(path, lora_dir / "first.safetensors", rank=4, seed=1, fmt="peft")
                make_tiny_lora(path, lora_dir / "second.safetensors", rank=2, seed=2, fmt="kohya")
            p = pipe(case.family, case.variant, kernels, str(lora_dir))
            for tag, loras in (("one", [("first", 0.7)]), ("two", [("first", 0.7), ("second", 1.3)]), ("none", [])):
                prefix = f"{kernels}/lora-{family}-{tag}"
                images = p(case.options, case.images(), recorder(prefix), loras=loras)
                results[f"{prefix}/images"] = torch.from_numpy(images)
            print(kernels, "lora", family, flush=True)

    results = {k: v.contiguous() for k, v in results.items()}
    file = folder / "golden.safetensors"
    if mode == "save":
        save_file(results, file)
        print(f"saved {len(results)} tensors")
    else:
        golden = load_file(file)
        assert set(golden) == set(results), set(golden) ^ set(results)
        bad = [k for k in golden if not torch.equal(golden[k], results[k])]
        print(f"compared {len(golden)} tensors: {len(bad)} differ")
        for k in bad[:20]:
            print("DIFF", k, (golden[k].float() - results[k].float()).abs().max().item())
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
