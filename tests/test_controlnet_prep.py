"""Module-level parity of our ControlNet forwards (`imagegen.common.families.controlnet_dit`) with diffusers 0.42.1's
`QwenImageControlNetModel` / `QwenImageMultiControlNetModel` / `ZImageControlNetModel` feeding the transformers'
`controlnet_block_samples`, in fp32 on the CPU and in this session; the same rows under a lockstep
sequence-parallel emulation; trap tests that show the checks catch a misplaced, skipped or unscaled residual."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from diffusers import QwenImageMultiControlNetModel, QwenImageTransformer2DModel, ZImageControlNetModel

from imagegen.common import tiny
from imagegen.common.attention import LOCAL_ATTENTION, AttentionLayout, Heads, sdpa
from imagegen.common.families.controlnet_dit import (
    QwenControlNet,
    ZImageControl,
    ZImageControlNet,
    qwen_block_residuals,
    qwen_forward_with_residuals,
    z_image_forward_with_hints,
    z_image_stage,
)
from imagegen.common.families.qwen_image.dit import QwenDiT, qwen_rotary
from imagegen.common.families.z_image import padded_length
from imagegen.common.families.z_image.dit import ImageSlots, ZImageDiT
from imagegen.common.latents import patchify, unpatchify
from imagegen.common.sharding import SequencePlan
from imagegen.common.tiny_controlnet import build_tiny_controlnet, build_tiny_controlnet_model

pytestmark = pytest.mark.usefixtures("parity_threads")

TOL = 1e-6
TRAP_MIN = 1e-3  # a wrong residual moves the output by far more than rounding
QWEN_GRID = (1, 3, 5)  # 15 noisy tokens: odd, so two ranks hold unequal blocks
Z_GRID = (10, 12)  # latent rows, cols -> 30 tokens + 2 registers: every rank of 2 and 3 holds latent rows
TEXT_LEN = 7


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ lockstep SP emulation
class _Lockstep:
    """P threads, one per rank, meet at every attention call: each attends with its own query rows over every
    rank's real key rows in single-process order (what the Ulysses and ring backends compute), so a rank's
    forward sees exactly the sequence one process would."""

    def __init__(self, plans: list[SequencePlan]) -> None:
        self.plans = plans
        self.barrier = threading.Barrier(len(plans))
        self.posted: list[Heads | None] = [None] * len(plans)

    def backend(self, rank: int) -> _LockstepAttention:
        return _LockstepAttention(self, rank)

    def run(self, work) -> list:
        results: list = [None] * len(self.plans)
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                with torch.no_grad():
                    results[rank] = work(rank)
            except BaseException as exc:  # surfaced below; abort the others' barrier waits
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(len(self.plans))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class _LockstepAttention:
    def __init__(self, group: _Lockstep, rank: int) -> None:
        self.group, self.rank = group, rank

    def joint(self, sharded: Heads | None, replicated: Heads | None, replicated_first: bool):
        group, plan = self.group, self.group.plans[self.rank]
        group.posted[self.rank] = sharded
        group.barrier.wait()
        keys, values, index = [], [], []
        for other, heads in zip(group.plans, group.posted, strict=True):
            keys.append(heads.k[:, other.local_real])
            values.append(heads.v[:, other.local_real])
            index.append(other.local_index[other.local_real])
        group.barrier.wait()  # every rank has read the posts before any rank posts again
        order = torch.argsort(torch.cat(index))
        full = Heads(sharded.q, torch.cat(keys, 1)[:, order], torch.cat(values, 1)[:, order])
        parts = [p for p in ((replicated, full) if replicated_first else (full, replicated)) if p is not None]
        queries = [p.q for p in parts]
        out = sdpa(torch.cat(queries, 1), torch.cat([p.k for p in parts], 1), torch.cat([p.v for p in parts], 1))
        pieces = dict(zip((id(p) for p in parts), out.split([q.shape[1] for q in queries], dim=1), strict=True))
        sharded_out = pieces[id(full)] * plan.local_real[None, :, None, None]
        return sharded_out, (pieces[id(replicated)] if replicated is not None else None)


# ------------------------------------------------------------------------------------------------- Qwen-Image
@pytest.fixture(scope="module")
def qwen():
    """A 3-block tiny Qwen DiT (so the union's 2 samples map to blocks [0, 0, 1]), its diffusers twin, and the two
    tiny ControlNets (ours and the reference each own their modules: our processors replace theirs)."""
    base = tiny._qwen_transformer(0, zero_cond_t=False)
    config = {**base.config, "num_layers": 3}
    transformer = tiny._seeded(0, 2, lambda: QwenImageTransformer2DModel.from_config(config))
    union = build_tiny_controlnet_model("qwen-image", "union")
    inpaint = build_tiny_controlnet_model("qwen-image", "inpaint")
    refs = {"transformer": copy.deepcopy(transformer), "union": copy.deepcopy(union), "inpaint": copy.deepcopy(inpaint)}
    ours = {"dit": QwenDiT(transformer), "union": QwenControlNet(union), "inpaint": QwenControlNet(inpaint)}
    seq = QWEN_GRID[1] * QWEN_GRID[2]
    inputs = {
        "noisy": _randn(1, seq, 64, seed=1),
        "text": _randn(1, TEXT_LEN, tiny.QWEN_TEXT_HIDDEN, seed=2),
        "controls": [_randn(1, seq, 64, seed=3), _randn(1, seq, 64, seed=4)],
        "inpaint_control": _randn(1, seq, 68, seed=5),
        "timestep": torch.tensor([0.7]),
    }
    return refs, ours, inputs


def _qwen_reference(refs, inputs, net: str, controls, scales):
    """diffusers: the union net through `QwenImageMultiControlNetModel` (one net, several images), the inpainting
    net alone; then the transformer with the samples."""
    kwargs = dict(
        hidden_states=inputs["noisy"],
        encoder_hidden_states=inputs["text"],
        timestep=inputs["timestep"],
        img_shapes=[QWEN_GRID],
        return_dict=False,
    )
    with torch.no_grad():
        if net == "union":
            model = QwenImageMultiControlNetModel([refs["union"]])
            samples = model(controlnet_cond=controls, conditioning_scale=scales, **kwargs)
        else:
            samples = refs[net](controlnet_cond=controls[0], conditioning_scale=scales[0], **kwargs)
        out = refs["transformer"](
            hidden_states=inputs["noisy"],
            encoder_hidden_states=inputs["text"],
            timestep=inputs["timestep"],
            img_shapes=[[QWEN_GRID]],
            controlnet_block_samples=samples,
            return_dict=False,
        )[0]
    return samples, out


def _qwen_layouts(ours, net: str, backend=LOCAL_ATTENTION, rows: torch.Tensor | None = None):
    """(ControlNet layout, DiT layout): each from its own RoPE tables, optionally on a rank's rows."""
    tables = (ours[net].rotary(QWEN_GRID, TEXT_LEN), qwen_rotary(ours["dit"].transformer, [QWEN_GRID], TEXT_LEN))
    return [AttentionLayout(backend, image if rows is None else image.index(rows), text) for image, text in tables]


def _qwen_ours(ours, inputs, net, controls, scales, backend=LOCAL_ATTENTION, plan=None, interval_bug=False):
    take = (lambda x: x) if plan is None else plan.take_local
    cn_layout, dit_layout = _qwen_layouts(ours, net, backend, None if plan is None else plan.local_index)
    noisy = take(inputs["noisy"])
    with torch.no_grad():
        samples = [
            ours[net](noisy, take(c), inputs["text"], inputs["timestep"], cn_layout, s)
            for c, s in zip(controls, scales, strict=True)
        ]
        blocks = len(ours["dit"].transformer.transformer_blocks)
        residuals = qwen_block_residuals(samples, blocks)
        if interval_bug:  # trap: sample i % n instead of i // ceil(blocks / n)
            residuals = [samples[0][i % len(samples[0])] for i in range(blocks)]
        out = qwen_forward_with_residuals(ours["dit"], noisy, inputs["text"], inputs["timestep"], dit_layout, residuals)
    return samples, out


QWEN_CASES = {
    # two control images through one union net with different scales: diffusers' multi-ControlNet semantics
    "union-two-images": ("union", "controls", (0.7, 0.3)),
    # the inpainting net: 4 extra input features (mask), one sample shared by all three blocks
    "inpaint-net": ("inpaint", "inpaint_control", (1.0,)),
}


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen_residuals_and_dit_equal_diffusers(qwen, case):
    refs, ours, inputs = qwen
    net, key, scales = QWEN_CASES[case]
    controls = inputs[key] if isinstance(inputs[key], list) else [inputs[key]]
    ref_samples, ref_out = _qwen_reference(refs, inputs, net, controls, list(scales))
    samples, out = _qwen_ours(ours, inputs, net, controls, scales)
    summed = [sum(parts[1:], parts[0]) for parts in zip(*samples, strict=True)]
    assert len(summed) == len(ref_samples)
    for mine, theirs in zip(summed, ref_samples, strict=True):
        assert _max_diff(mine, theirs) <= TOL
    assert _max_diff(out, ref_out) <= TOL
    assert ref_out.abs().max() > 0.1  # a live output, not a vanished one


def test_qwen_traps_fail_the_check(qwen):
    refs, ours, inputs = qwen
    controls, scales = inputs["controls"], [0.7, 0.3]
    _, ref_out = _qwen_reference(refs, inputs, "union", controls, scales)
    # scale ignored
    _, unscaled = _qwen_ours(ours, inputs, "union", controls, (1.0, 1.0))
    assert _max_diff(unscaled, ref_out) > TRAP_MIN
    # samples mapped to blocks by i % n: block 1 gets sample 1 instead of 0
    _, misplaced = _qwen_ours(ours, inputs, "union", controls[:1], scales[:1], interval_bug=True)
    _, right = _qwen_reference(refs, inputs, "union", controls[:1], scales[:1])
    assert _max_diff(misplaced, right) > TRAP_MIN
    # the residual added to the text tokens instead of the image tokens
    dit = ours["dit"]
    cn_layout, dit_layout = _qwen_layouts(ours, "union")
    with torch.no_grad():
        samples = [ours["union"](inputs["noisy"], c, inputs["text"], inputs["timestep"], cn_layout, s)
                   for c, s in zip(controls, scales, strict=True)]  # fmt: skip
        residuals = qwen_block_residuals(samples, 3)
        tr = dit.transformer
        hidden, text = tr.img_in(inputs["noisy"]), tr.txt_in(tr.txt_norm(inputs["text"]))
        temb = tr.time_text_embed(inputs["timestep"], hidden)
        for block, residual in zip(tr.transformer_blocks, residuals, strict=True):
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                 temb=temb, image_rotary_emb=dit_layout)  # fmt: skip
            text = text + residual[:, :TEXT_LEN]
        wrong_stream = tr.proj_out(tr.norm_out(hidden, temb))
    assert _max_diff(wrong_stream, ref_out) > TRAP_MIN


@pytest.mark.parametrize("world", [2, 3])
def test_qwen_rank_rows_equal_one_process(qwen, world):
    _, ours, inputs = qwen
    controls, scales = inputs["controls"], (0.7, 0.3)
    _, full = _qwen_ours(ours, inputs, "union", controls, scales)
    plans = [SequencePlan((full.shape[1],), world, r) for r in range(world)]
    group = _Lockstep(plans)
    outs = group.run(lambda r: _qwen_ours(ours, inputs, "union", controls, scales, group.backend(r), plans[r])[1])
    for plan, out in zip(plans, outs, strict=True):
        real = plan.local_real
        assert _max_diff(out[:, real], full[:, plan.local_index[real]]) <= TOL


# ---------------------------------------------------------------------------------------------------- Z-Image
Z_NETS = ("union", "union-2.0", "union-2.1")


@pytest.fixture(scope="module")
def zimage():
    transformer = tiny._z_transformer(0)
    nets = {v: build_tiny_controlnet_model("z-image", v) for v in Z_NETS}
    ref_transformer = copy.deepcopy(transformer)
    refs = {v: ZImageControlNetModel.from_transformer(copy.deepcopy(n), ref_transformer) for v, n in nets.items()}
    refs["transformer"] = ref_transformer
    dit = ZImageDiT(transformer)
    ours = {"dit": dit, **{v: ZImageControlNet(n, transformer) for v, n in nets.items()}}
    rows, cols = Z_GRID
    inputs = {
        "latent": _randn(1, 16, rows, cols, seed=11),
        "caption": _randn(9, tiny.QWEN3_HIDDEN, seed=12),
        "control16": _randn(1, 16, rows, cols, seed=13),
        "control33": _randn(1, 33, rows, cols, seed=14),
        "timestep": torch.tensor([0.35]),
    }
    return refs, ours, inputs


def _z_control(inputs, net: str) -> torch.Tensor:
    return inputs["control16" if net == "union" else "control33"]


def _z_reference(refs, inputs, controls: list[tuple[str, float]]):
    x = [inputs["latent"][0, :, None]]
    caps = [inputs["caption"]]
    hints: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for net, scale in controls:
            control = _z_control(inputs, net)[:, :, None]
            for place, hint in refs[net](x, inputs["timestep"], caps, control, conditioning_scale=scale).items():
                hints[place] = hint if place not in hints else hints[place] + hint
        out = refs["transformer"](x, inputs["timestep"], caps, controlnet_block_samples=hints, return_dict=False)[0]
    return hints, out[0][:, 0]


def _z_setup(ours, inputs, plan: SequencePlan):
    rows, cols = (s // 2 for s in Z_GRID)
    slots = ImageSlots(plan, rows * cols)
    branch = ours["dit"].branch(inputs["caption"], rows, cols, slots)
    start = plan.segment_range(0)[0]

    def local(latent: torch.Tensor) -> torch.Tensor:
        return patchify(latent, channel_last=True)[:, start : start + slots.local_latent]

    return slots, branch, local


def _z_ours(ours, inputs, controls, backend=LOCAL_ATTENTION, plan=None, net_class=None):
    plan = plan or SequencePlan((padded_length((Z_GRID[0] // 2) * (Z_GRID[1] // 2)),))
    slots, branch, local = _z_setup(ours, inputs, plan)
    items = []
    for net, scale in controls:
        control_net = ours[net] if net_class is None else net_class(ours[net].controlnet, ours["dit"].transformer)
        items.append(ZImageControl(control_net, local(_z_control(inputs, net)), scale))
    with torch.no_grad():
        out = z_image_forward_with_hints(ours["dit"], local(inputs["latent"]), inputs["timestep"], branch, slots,
                                         backend, items)  # fmt: skip
    return out


@pytest.mark.parametrize("net", Z_NETS)
def test_z_image_hints_equal_diffusers(zimage, net):
    """Each published layout: no control refiner (1.0), the control layers as refiner (2.0), a control refiner
    with hints into the ControlNet's own noise refiner (2.1)."""
    refs, ours, inputs = zimage
    ref_hints, _ = _z_reference(refs, inputs, [(net, 0.6)])
    plan = SequencePlan((padded_length((Z_GRID[0] // 2) * (Z_GRID[1] // 2)),))
    slots, branch, local = _z_setup(ours, inputs, plan)
    with torch.no_grad():
        stage = z_image_stage(ours["dit"], local(inputs["latent"]), inputs["timestep"], branch, slots, LOCAL_ATTENTION)
        control_net = ours[net]
        hints = control_net.hints(control_net.embed(local(_z_control(inputs, net)), slots), stage, 0.6)
    assert sorted(hints) == sorted(ref_hints)
    for place, hint in hints.items():
        assert hint.shape == ref_hints[place].shape  # image rows and caption rows
        assert _max_diff(hint, ref_hints[place]) <= TOL


def test_z_image_two_controlnets_equal_diffusers(zimage):
    """Two different ControlNets with different scales: hints summed per main layer (diffusers has no multi
    wrapper for Z-Image; this is the reference composed from its modules the way the Qwen wrapper sums)."""
    refs, ours, inputs = zimage
    controls = [("union", 0.75), ("union-2.1", 0.4)]
    _, ref_out = _z_reference(refs, inputs, controls)
    out = unpatchify(_z_ours(ours, inputs, controls), *Z_GRID, channel_last=True)
    assert _max_diff(out, ref_out[None]) <= TOL
    assert ref_out.abs().max() > 0.1


class _ImageRowsOnly(ZImageControlNet):
    """Trap: hints added to the image rows only (their caption rows dropped)."""

    def hints(self, control, stage, scale):
        hints = super().hints(control, stage, scale)
        image_rows = stage.refined.shape[1]
        return {place: torch.cat([h[:, :image_rows], 0 * h[:, image_rows:]], 1) for place, h in hints.items()}


def test_z_image_traps_fail_the_check(zimage):
    refs, ours, inputs = zimage
    controls = [("union-2.1", 0.4)]
    _, ref_out = _z_reference(refs, inputs, controls)
    image_only = unpatchify(_z_ours(ours, inputs, controls, net_class=_ImageRowsOnly), *Z_GRID, channel_last=True)
    assert _max_diff(image_only, ref_out[None]) > TRAP_MIN
    unscaled = unpatchify(_z_ours(ours, inputs, [("union-2.1", 1.0)]), *Z_GRID, channel_last=True)
    assert _max_diff(unscaled, ref_out[None]) > TRAP_MIN
    skipped = unpatchify(_z_ours(ours, inputs, []), *Z_GRID, channel_last=True)
    assert _max_diff(skipped, ref_out[None]) > TRAP_MIN


@pytest.mark.parametrize("world", [2, 3])
def test_z_image_rank_rows_equal_one_process(zimage, world):
    _, ours, inputs = zimage
    controls = [("union", 0.75), ("union-2.0", 0.5)]
    full = _z_ours(ours, inputs, controls)
    n_latent = full.shape[1]
    plans = [SequencePlan((padded_length(n_latent),), world, r) for r in range(world)]
    group = _Lockstep(plans)
    outs = group.run(lambda r: _z_ours(ours, inputs, controls, group.backend(r), plans[r]))
    for plan, out in zip(plans, outs, strict=True):
        start = plan.segment_range(0)[0]
        assert out.shape[1] > 0
        assert _max_diff(out, full[:, start : start + out.shape[1]]) <= TOL


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(("family", "variant"), [("qwen-image", "inpaint"), ("z-image", "union-2.1")])
def test_tiny_controlnet_reloads_offline_with_live_outputs(tmp_path, family, variant):
    """`from_pretrained` gives back the same bits, and the projections diffusers zero-initialises are not zero."""
    from diffusers import QwenImageControlNetModel

    cls = QwenImageControlNetModel if family == "qwen-image" else ZImageControlNetModel
    folder = build_tiny_controlnet(family, tmp_path / "cn", variant)
    loaded = cls.from_pretrained(folder, local_files_only=True).state_dict()
    built = build_tiny_controlnet_model(family, variant).state_dict()
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[k], built[k]) for k in built)
    output_projections = [k for k in built if k.startswith(("controlnet_blocks", "controlnet_x_embedder"))
                          or ".after_proj." in k or ".before_proj." in k]  # fmt: skip
    assert output_projections
    assert all(built[k].abs().min() > 0 or built[k].std() > 0.01 for k in output_projections)
