"""Full-size Qwen-Image-2.1 DiT on one GPU (random bf16 weights, the published shapes = the class defaults):
our reference forward (`common/families/qwen_image_21/dit.py`) against diffusers' `QwenImage21Transformer2DModel`
forward on the same modules, in the pipeline's modes (step 0 "extract" fills the prefix KV cache, later steps
"cached"), text-to-image at 1024x1024 and image-conditioned with one 1024x1024 condition image.

Success: every comparison `bitwise: true` (the reference path must equal diffusers bit for bit on the GPU too);
the per-step times say what a fast path has to beat. Writes `$OUT/qwen21_dit_gpu.json` when OUT is set.

    bench/gpu_env.sh-sourced:  python3 bench/qwen21_dit_gpu.py            (about 2 minutes on an H200)
    on the CPU (tiny shapes):  python3 bench/qwen21_dit_gpu.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21KVCache,
)

from imagegen.common.attention import LOCAL_ATTENTION
from imagegen.common.families.qwen_image_21.dit import Qwen21Sequence, QwenImage21DiT, layout_for

SMOKE = dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, context_in_dim=48)
SMOKE["axes_dims_rope"] = (4, 6, 6)


def build(device: torch.device, dtype: torch.dtype, smoke: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = QwenImage21Transformer2DModel(**(SMOKE if smoke else {}))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def scenario(name: str, text_len: int, side: int, condition_side: int | None) -> tuple[str, Qwen21Sequence]:
    slots = torch.zeros(text_len, dtype=torch.bool)
    conditions = ()
    if condition_side:
        slots = torch.cat([slots[:6], torch.ones(condition_side**2 // 4, dtype=torch.bool), slots[6:]])
        conditions = ((1, condition_side, condition_side),)
    return name, Qwen21Sequence(slots, conditions, (1, side, side))


def timed(call, device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def use(transformer: torch.nn.Module, processors: list) -> None:
    for block, processor in zip(transformer.transformer_blocks, processors, strict=True):
        block.attn.set_processor(processor)


@torch.no_grad()
def run_case(tr, dit, ours: list, sequence: Qwen21Sequence, dtype, generator, repeats: int) -> dict:
    """Step 0 ("extract") once and a later step ("cached") `repeats` times, diffusers then ours."""
    device = tr.img_in.weight.device
    reference = [QwenImage21AttnProcessor() for _ in tr.transformer_blocks]
    text = torch.randn(1, len(sequence.slots), tr.config.context_in_dim, generator=generator).to(device, dtype)
    target = torch.randn(1, sequence.target_tokens, 64, generator=generator).to(device, dtype)
    cond = None
    if sequence.condition_tokens:
        cond = torch.randn(1, sequence.condition_tokens, 64, generator=generator).to(device, dtype)
    img_mask = torch.cat([sequence.slots, torch.ones(sequence.target_tokens // 4, dtype=torch.bool)])[None]
    img_mask = img_mask.to(device)
    shapes = [[*sequence.condition_shapes, sequence.target_shape]]
    hidden = target if cond is None else torch.cat([cond, target], 1)

    def diffusers_call(t, cache, mode):
        use(tr, reference)
        out = tr(hidden, text, t, shapes, img_mask, kv_cache=cache, kv_cache_mode=mode, return_dict=False)[0]
        return out[:, -target.shape[1] :]

    def ours_call(t, cache, mode):
        use(tr, ours)
        layout = layout_for(tr, sequence, LOCAL_ATTENTION, mode, cache)
        if mode == "cached":
            return dit(target, t, layout, None, None, cond)
        return dit(target, t, layout, text, sequence, cond)

    t0, t1 = (torch.tensor([v], dtype=dtype, device=device) for v in (0.9, 0.5))
    ref_cache, our_cache = QwenImage21KVCache(len(tr.transformer_blocks)), dit.new_cache()
    ref0, ref0_s = timed(lambda: diffusers_call(t0, ref_cache, "extract"), device, 1)
    our0, our0_s = timed(lambda: ours_call(t0, our_cache, "extract"), device, 1)
    ref1, ref1_s = timed(lambda: diffusers_call(t1, ref_cache, "cached"), device, repeats)
    our1, our1_s = timed(lambda: ours_call(t1, our_cache, "cached"), device, repeats)
    row = {"prefix_len": sequence.prefix_len, "target_tokens": sequence.target_tokens}
    for mode, a, b, sa, sb in (("extract", our0, ref0, our0_s, ref0_s), ("cached", our1, ref1, our1_s, ref1_s)):
        row[mode] = {
            "bitwise": bool(torch.equal(a, b)),
            "max_abs_diff": (a.float() - b.float()).abs().max().item(),
            "ours_s": round(sa, 4),
            "diffusers_s": round(sb, 4),
        }
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of this script)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tr = build(device, dtype, args.smoke)
    side, condition = (4, 4) if args.smoke else (64, 64)  # 1024x1024: 64x64 tokens
    cases = [scenario("t2i-1024", 120, side, None), scenario("edit-1024", 80, side, condition)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"config": dict(tr.config), "device": name}
    dit = QwenImage21DiT(tr)
    ours = [block.attn.processor for block in tr.transformer_blocks]
    generator = torch.Generator().manual_seed(1)
    failures = 0
    for case, sequence in cases:
        results[case] = run_case(tr, dit, ours, sequence, dtype, generator, args.repeats)
        failures += sum(not results[case][mode]["bitwise"] for mode in ("extract", "cached"))
        print(case, json.dumps(results[case]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "qwen21_dit_gpu.json").write_text(json.dumps(results, indent=2, default=str))
    print("PASS" if failures == 0 else f"FAIL ({failures} comparisons not bitwise)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
