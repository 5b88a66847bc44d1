"""Qwen-Image-2.1 groundwork: the tiny checkpoint loads and runs in the real `QwenImage21Pipeline`, and our
reference DiT forward (`qwen_image_21_dit`) equals diffusers' `QwenImage21Transformer2DModel` forward, run in
this session, bit for bit in every cache mode; trap tests show the comparison catches a bf16 RoPE table and a
prefix that is not block-causal; a 2-rank gloo group shows the existing Ulysses and ring backends keep the
target rows exact through `attend_prefixed`."""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass, replace

import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor, QwenImage21KVCache
from safetensors.torch import load_file, save_file

from imagegen.common.attention import LOCAL_ATTENTION
from imagegen.common.families.qwen_image_21.dit import (
    Qwen21Sequence,
    QwenImage21DiT,
    layout_for,
    qwen21_rotary,
)
from imagegen.common.rope import Rotary
from imagegen.common.tiny_qwen_image_21 import TURBO_SIGMAS, build_qwen_image_21, build_qwen_image_21_pipeline

pytestmark = pytest.mark.usefixtures("parity_threads")

PROMPT = "a red fox in the snow"
CONTEXT_DIM = 48  # the tiny text encoder's width


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return build_qwen_image_21(tmp_path_factory.mktemp("qwen21") / "tiny")


@pytest.fixture(scope="module")
def transformer():
    return build_qwen_image_21_pipeline(0).transformer


def _run(pipe: QwenImage21Pipeline, prompt: str, **kwargs) -> torch.Tensor:
    options = dict(height=64, width=64, num_inference_steps=2, output_type="pt")
    options.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **options).images


def test_tiny_checkpoint_loads_offline_and_runs(folder, transformer) -> None:
    pipe = QwenImage21Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel"
    saved, built = pipe.transformer.state_dict(), transformer.state_dict()
    assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved)  # bit-identical
    image = _run(pipe, PROMPT)
    assert image.shape == (1, 4, 64, 64)  # RGBA: the 2.1 VAE decodes four channels
    assert torch.isfinite(image).all() and image.std() > 0.05
    # The prompt matters (weights drawn so that no path hides behind a zero): another prompt moves the image.
    assert (_run(pipe, "a blue owl at night") - image).abs().max() > 1e-2
    assert torch.equal(_run(pipe, PROMPT), image)  # deterministic
    # Image-conditioned mode: the condition image's vision slots must match its latent tokens, or diffusers raises.
    condition = (image[0, :3] * 255).round().byte().permute(1, 2, 0).numpy()
    edited = _run(pipe, "make it blue", image=condition, height=None, width=None, output_resolution=64)
    assert edited.shape == (1, 4, 64, 64) and (edited - image).abs().max() > 1e-2


def test_six_head_variant_builds(tmp_path) -> None:
    """A DiT whose head count 4 Ulysses ranks cannot split (the layout chooser must fall back to the ring)."""
    folder = build_qwen_image_21(tmp_path / "h6", heads=6)
    pipe = QwenImage21Pipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.transformer.config.num_attention_heads == 6


def test_turbo_variant_samples_its_stored_sigmas(tmp_path) -> None:
    folder = build_qwen_image_21(tmp_path / "turbo", variant="turbo")
    pipe = QwenImage21Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.sample_sigmas == TURBO_SIGMAS
    steps = []
    _run(pipe, PROMPT, num_inference_steps=7, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert len(steps) == len(TURBO_SIGMAS)  # the stored grid wins over num_inference_steps


# --------------------------------------------------------------------------------------------- DiT parity
@dataclass(frozen=True)
class DitCase:
    text_len: int
    target: tuple[int, int, int]
    conditions: tuple[tuple[int, int, int], ...] = ()

    def sequence(self) -> Qwen21Sequence:
        """Vision slots after 3 text tokens, 2 text tokens between images (as `Picture k:`-like text would)."""
        slots = torch.zeros(self.text_len, dtype=torch.bool)
        position = 3
        for _, h, w in self.conditions:
            slots[position : position + h * w // 4] = True
            position += h * w // 4 + 2
        return Qwen21Sequence(slots, self.conditions, self.target)

    def inputs(self, seed: int) -> dict[str, torch.Tensor | None]:
        g = torch.Generator().manual_seed(seed)
        condition_tokens = sum(math.prod(s) for s in self.conditions)
        return {
            "text": torch.randn(1, self.text_len, CONTEXT_DIM, generator=g),
            "target": torch.randn(1, math.prod(self.target), 64, generator=g),
            "target_next": torch.randn(1, math.prod(self.target), 64, generator=g),
            "condition": torch.randn(1, condition_tokens, 64, generator=g) if self.conditions else None,
        }


# Two prompt lengths (odd and even: the joint sequence is odd for 13 + 16) x two sizes (64x64: 16 target tokens,
# not divisible by 3; 160x32: 20, not divisible by 3 or 8), plus image-conditioned sequences with one and two
# condition blocks. A target count is always a multiple of 4 (one vision slot = 2x2 tokens; the pipeline rounds
# sizes to 32 pixels), so an odd target count cannot occur in this model.
DIT_CASES = {
    "short-64x64": DitCase(13, (1, 4, 4)),
    "long-160x32": DitCase(28, (1, 2, 10)),
    "short-160x32": DitCase(13, (1, 2, 10)),
    "long-64x64": DitCase(28, (1, 4, 4)),
    "one-condition": DitCase(21, (1, 4, 4), ((1, 2, 4),)),
    "two-conditions": DitCase(30, (1, 2, 6), ((1, 2, 2), (1, 4, 2))),
}


def _diffusers_forward(transformer, case: DitCase, target, inputs, timestep, cache=None, mode=None) -> torch.Tensor:
    for block in transformer.transformer_blocks:
        block.attn.set_processor(QwenImage21AttnProcessor())
    sequence = case.sequence()
    hidden = target if inputs["condition"] is None else torch.cat([inputs["condition"], target], dim=1)
    img_mask = torch.cat([sequence.slots, torch.ones(sequence.target_tokens // 4, dtype=torch.bool)])[None]
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=inputs["text"],
        timestep=timestep,
        img_shapes=[[*case.conditions, case.target]],
        img_mask=img_mask,
        kv_cache=cache,
        kv_cache_mode=mode,
        return_dict=False,
    )[0]
    return out[:, -target.shape[1] :]


T0, T1 = torch.tensor([0.9]), torch.tensor([0.55])


@torch.no_grad()
def _three_modes(transformer, case: DitCase, inputs, ours: bool, **layout_changes) -> list[torch.Tensor]:
    """Outputs of a plain forward, a cache-filling forward at t0 and a cached forward at t1 (new target)."""
    if not ours:
        cache = QwenImage21KVCache(len(transformer.transformer_blocks))
        return [
            _diffusers_forward(transformer, case, inputs["target"], inputs, T0),
            _diffusers_forward(transformer, case, inputs["target"], inputs, T0, cache, "extract"),
            _diffusers_forward(transformer, case, inputs["target_next"], inputs, T1, cache, "cached"),
        ]
    dit = QwenImage21DiT(transformer)
    sequence = case.sequence()
    cache = dit.new_cache()

    def layout(mode: str, cache=None):
        return replace(layout_for(transformer, sequence, LOCAL_ATTENTION, mode, cache), **layout_changes)

    text, condition = inputs["text"], inputs["condition"]
    return [
        dit(inputs["target"], T0, layout("full"), text, sequence, condition),
        dit(inputs["target"], T0, layout("extract", cache), text, sequence, condition),
        dit(inputs["target_next"], T1, layout("cached", cache), None, None, condition),
    ]


@pytest.mark.parametrize("name", list(DIT_CASES))
def test_dit_forward_equals_diffusers_bitwise(transformer, name) -> None:
    case = DIT_CASES[name]
    inputs = case.inputs(seed=len(name))
    reference = _three_modes(transformer, case, inputs, ours=False)
    ours = _three_modes(transformer, case, inputs, ours=True)
    for mode, a, b in zip(("full", "extract", "cached"), ours, reference, strict=True):
        assert a.shape == b.shape == inputs["target"].shape
        assert torch.equal(a, b), f"{mode}: max |ours - diffusers| = {(a - b).abs().max().item():.3g}"
    assert (reference[2] - reference[0]).abs().max() > 1e-2  # the cached step is a different step


def test_rotary_rows_equal_diffusers_pos_embed(transformer) -> None:
    case = DIT_CASES["two-conditions"]
    sequence = case.sequence()
    prefix, target = qwen21_rotary(transformer, sequence)
    image_pad_mask = torch.ones(sequence.prefix_len + sequence.target_tokens, dtype=torch.bool)
    image_pad_mask[: sequence.prefix_len] = sequence.block_ids >= 0
    expected = transformer.pos_embed([*case.conditions, case.target], image_pad_mask, torch.device("cpu"))
    assert torch.equal(torch.cat([prefix.freqs, target.freqs]), expected)


def _bf16_rotary(rotary: Rotary) -> Rotary:
    real = torch.view_as_real(rotary.freqs).to(torch.bfloat16).float()
    return Rotary(torch.view_as_complex(real.contiguous()))


@pytest.mark.parametrize("trap", ["bf16-rope", "bidirectional-prefix"])
def test_trap_the_comparison_fails_on_a_wrong_forward(transformer, trap) -> None:
    case = DIT_CASES["one-condition"]
    inputs = case.inputs(seed=3)
    reference = _three_modes(transformer, case, inputs, ours=False)
    if trap == "bf16-rope":
        full = layout_for(transformer, case.sequence(), LOCAL_ATTENTION)
        changes = {"target_rotary": _bf16_rotary(full.target_rotary)}
    else:
        changes = {"causal": False}  # plain joint attention over the prefix, as Qwen-Image has
    ours = _three_modes(transformer, case, inputs, ours=True, **changes)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    assert worst > 1e-4, f"{trap}: the forward should have moved the output, moved {worst:.3g}"


# ------------------------------------------------------------------------------------- sequence parallelism
SP_CASES = ("short-64x64", "two-conditions")
SP_BACKENDS = ("ulysses", "ring-ordered")


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a gloo group: our forward in all three modes on this rank's target rows through each backend;
    rank 0 writes every gathered output."""
    import torch.distributed as dist

    from imagegen.common.parallel.layout import SequenceParallelLayout
    from imagegen.common.parallel.ring import RingShift
    from imagegen.common.parallel.ulysses import UlyssesAttention
    from imagegen.common.parallel.usp import UlyssesRingAttention
    from imagegen.common.sharding import SequencePlan
    from tests.parity import THREADS

    torch.set_num_threads(THREADS)  # as the one-process side: CPU rounding moves with the thread count
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    transformer = build_qwen_image_21_pipeline(0).transformer
    dit = QwenImage21DiT(transformer)
    results = {}
    with torch.no_grad():
        for name in SP_CASES:
            case = DIT_CASES[name]
            inputs = case.inputs(seed=len(name))
            sequence = case.sequence()
            plan = SequencePlan((sequence.target_tokens,), world, rank)
            for backend_name in SP_BACKENDS:
                if backend_name == "ulysses":
                    backend = UlyssesAttention(plan, group, torch.device("cpu"))
                else:
                    ring = RingShift(list(range(world)), rank, group)
                    layout = SequenceParallelLayout(1, world)
                    backend = UlyssesRingAttention(plan, layout, None, ring, torch.device("cpu"))
                cache = dit.new_cache()

                def layout_of(mode: str, backend=backend, cache=cache, sequence=sequence, plan=plan):
                    return layout_for(transformer, sequence, backend, mode, cache, target_rows=plan.local_index)

                text, condition = inputs["text"], inputs["condition"]
                local = [plan.take_local(inputs[k]) for k in ("target", "target_next")]
                outputs = [
                    dit(local[0], T0, layout_of("full"), text, sequence, condition),
                    dit(local[0], T0, layout_of("extract"), text, sequence, condition),
                    dit(local[1], T1, layout_of("cached"), None, None, condition),
                ]
                for mode, out in zip(("full", "extract", "cached"), outputs, strict=True):
                    parts = [torch.empty_like(out) for _ in range(world)]
                    dist.all_gather(parts, out.contiguous(), group=group)
                    plans = [SequencePlan((sequence.target_tokens,), world, r) for r in range(world)]
                    real = [part[:, p.local_real] for part, p in zip(parts, plans, strict=True)]
                    results[f"{name}/{backend_name}/{mode}"] = torch.cat(real, dim=1).contiguous()
    if rank == 0:
        save_file(results, os.path.join(out_dir, "sp.safetensors"))
    dist.destroy_process_group()


def test_sp2_ulysses_and_ring_keep_the_target_exact(transformer, tmp_path) -> None:
    """2 ranks (gloo): the target sharded (8 real rows + 8 padding rows each), the prefix replicated; the
    existing backends, given a replicated part with keys but no queries, reproduce one process."""
    from imagegen.common.parallel.launch import free_port
    from tests.ring_harness import forkserver

    world = 2
    ctx = forkserver()  # ranks forked from one interpreter that imported the runtime once (shared with test_ring)
    port = free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
    assert [p.exitcode for p in ranks] == [0] * world
    results = load_file(tmp_path / "sp.safetensors")
    for name in SP_CASES:
        case = DIT_CASES[name]
        single = _three_modes(transformer, case, case.inputs(seed=len(name)), ours=True)
        for backend_name in SP_BACKENDS:
            for mode, expected in zip(("full", "extract", "cached"), single, strict=True):
                got = results[f"{name}/{backend_name}/{mode}"]
                assert got.shape == expected.shape
                worst = (got - expected).abs().max().item()
                assert worst <= 1e-6, f"{name} {backend_name} {mode}: {worst:.3g}"
