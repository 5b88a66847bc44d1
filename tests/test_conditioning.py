"""`imagegen.common.conditioning` against diffusers 0.42.1 in this session, CPU fp32.

* its helpers against the pipelines' own (`get_timesteps`, `scale_noise`, the mask processor, the ControlNet
  window as `QwenImageControlNetPipeline` applies it);
* whole img2img / inpainting pipelines (`ZImageImg2ImgPipeline`, `ZImageInpaintPipeline`,
  `QwenImageImg2ImgPipeline`, `QwenImageInpaintPipeline`) against our current denoise stages driven through
  small seams: the family's `noise_for` / `schedule_for` give the noised init latents and the trimmed schedule,
  `StepHooks.after_step` does the blend. Final latents within 1e-5; two strengths, CFG on and off, a mask with
  holes at odd coordinates, `padding_mask_crop`; traps (blend skipped on the last step, the blend at the wrong
  sigma, the untrimmed schedule) fail the same check.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
)

from imagegen.common import conditioning as cond
from imagegen.common import tiny
from imagegen.common.denoise import DenoiseJob, StepHooks
from imagegen.common.families.qwen_image import pipeline as qwen_image
from imagegen.common.families.qwen_image.vae import QwenVae
from imagegen.common.families.z_image import pipeline as z_image
from imagegen.common.latents import patchify
from imagegen.common.options import ResolvedOptions
from imagegen.common.schedule import Schedule

pytestmark = pytest.mark.usefixtures("parity_threads")

TOL = 1e-5
TRAP_MIN = 1e-3
# The real schedules, kept before any test replaces the modules' functions.
SCHEDULES = {z_image: z_image.schedule_for, qwen_image: qwen_image.schedule_for}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _mask(width: int, height: int) -> PIL.Image.Image:
    """A repaint box with edges and two holes at odd pixel coordinates (nearest-neighbour resizing to the latent
    grid must pick the same cells as diffusers), in a grey-level mask that binarization cuts at 0.5."""
    array = np.zeros((height, width), dtype=np.uint8)
    array[9 : height - 7, 13 : width - 11] = 200
    array[17:27, 21:33] = 0
    array[29:35, 15:19] = 100  # below 0.5 after grayscale / 255: kept
    return PIL.Image.fromarray(array, "L")


# ------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.6, 0.75, 0.99, 1.0])
def test_trim_and_noise_equal_get_timesteps_and_scale_noise(steps, strength):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu")
    full = Schedule(scheduler.sigmas.clone(), scheduler.timesteps.clone())
    owner = types.SimpleNamespace(scheduler=scheduler)
    timesteps, kept = ZImageImg2ImgPipeline.get_timesteps(owner, steps, strength, "cpu")
    if kept < 1:
        with pytest.raises(ValueError):
            cond.trim_schedule(full, strength)
        return
    trimmed = cond.trim_schedule(full, strength)
    assert torch.equal(trimmed.timesteps, timesteps)
    assert trimmed.num_steps == kept
    assert torch.equal(trimmed.sigmas, scheduler.sigmas[scheduler.begin_index :])
    sample, noise = _randn(2, 16, 6, 4, seed=1), _randn(2, 16, 6, 4, seed=2)
    expected = scheduler.scale_noise(sample, timesteps[:1].repeat(2), noise)
    assert torch.equal(cond.noised_init(sample, noise, trimmed), expected)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_strength_out_of_range_is_refused(strength):
    schedule = Schedule(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1000.0, 500.0]))
    with pytest.raises(ValueError, match="strength"):
        cond.trim_schedule(schedule, strength)


def test_control_window_equals_qwen_controlnet_pipeline_formula():
    """The window's edges: a step is on when it starts at or after `start` and ends at or before `end`."""
    assert cond.control_keep(4, 0.0, 1.0) == [1.0] * 4
    assert cond.control_keep(4, 0.25, 0.75) == [0.0, 1.0, 1.0, 0.0]
    assert cond.control_keep(5, 0.3, 0.7) == [0.0, 0.0, 1.0, 0.0, 0.0]
    scales = cond.control_scales(4, [cond.ControlSettings(0.8, 0.25, 1.0), cond.ControlSettings(0.4, 0.0, 0.5)])
    assert scales == [[0.0, 0.4], [0.8, 0.4], [0.8, 0.0], [0.8, 0.0]]
    with pytest.raises(ValueError):
        cond.ControlSettings(1.0, 0.6, 0.6)


# --------------------------------------------------------------------------------- whole pipelines
@pytest.fixture(scope="module")
def z_pipe():
    return tiny.build_tiny_pipeline("z-image")


@pytest.fixture(scope="module")
def qwen_pipe():
    return tiny.build_tiny_pipeline("qwen-image")


def _options(family: str, width: int, height: int, steps: int, seed: int, cfg: bool, scale: float) -> ResolvedOptions:
    return ResolvedOptions(
        family=family,
        prompt="p",
        negative_prompt="n" if cfg else None,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=scale,
        cfg_normalization=0.0,
        cfg_truncation=1.0,
        max_sequence_length=64,
        seed=seed,
        num_images=1,
    )


class _Seams:
    """Drives a family's current denoise stage with img2img / inpainting inputs: its module-level `noise_for` /
    `schedule_for` replaced by the noised init latents and the trimmed schedule (monkeypatch), and the blend as
    `StepHooks.after_step` in the loop's token layout."""

    def __init__(self, monkeypatch, module, init_latents, noise, trimmed: Schedule) -> None:
        start = cond.noised_init(init_latents, noise, trimmed)
        packed = module is qwen_image
        monkeypatch.setattr(module, "noise_for", lambda *a, **k: patchify(start, False) if packed else start)
        monkeypatch.setattr(module, "schedule_for", lambda *a, **k: trimmed)


def _blend_hook(init, noise, mask, trimmed: Schedule, channel_last: bool, skip_last=False, shift=0) -> StepHooks:
    tokens = [patchify(x, channel_last=channel_last) for x in (init, noise, mask.expand_as(init))]

    def after_step(step: int, latents: torch.Tensor) -> torch.Tensor:
        if skip_last and step == trimmed.num_steps - 1:
            return latents
        return cond.blend_known(latents, *tokens[:2], tokens[2], trimmed, min(step + shift, trimmed.num_steps - 1))

    return StepHooks(after_step=after_step)


# ------------------------------------------------------------------------------------------- Z-Image
Z_SIZE = (64, 48)
# The CFG guidance. Our stage computes the time embedding and adaLN modulations on the row count that
# diffusers' CFG batch has (`imagegen.common.call_rows`); before that a guidance of 4 amplified the row-count
# rounding to 1.02e-5 after 3 steps.
Z_CFG = 4.0


def _z_inputs(z_pipe, seed: int, cfg: bool):
    vae = z_pipe.vae
    image = _image(*Z_SIZE, seed=seed)
    embeds = [_randn(9, tiny.QWEN3_HIDDEN, seed=seed + 1)]
    negative = [_randn(5, tiny.QWEN3_HIDDEN, seed=seed + 2)] if cfg else None
    pixels = cond.image_processor().preprocess(image, height=Z_SIZE[1], width=Z_SIZE[0]).to(torch.float32)
    generator = cond.init_generator(seed)
    with torch.no_grad():
        posterior = cond.sample_posterior(vae.encode(pixels).latent_dist, generator)
    init = cond.normalise_z_image(posterior, vae.config.shift_factor, vae.config.scaling_factor)
    noise = torch.randn(init.shape, generator=generator, dtype=torch.float32)
    return image, embeds, negative, init, noise


def _z_ours(z_pipe, monkeypatch, seed, strength, cfg, mask=None, trap=None):
    image, embeds, negative, init, noise = _z_inputs(z_pipe, seed, cfg)
    steps, scale = 4, (Z_CFG if cfg else 0.0)
    stage = z_image.ZImageDenoiser.from_transformer(copy.deepcopy(z_pipe.transformer), dict(z_pipe.scheduler.config))
    full = SCHEDULES[z_image](stage.scheduler_config, steps, *Z_SIZE)
    trimmed = full if trap == "untrimmed" else cond.trim_schedule(full, strength)
    _Seams(monkeypatch, z_image, init, noise, trimmed)
    hooks = StepHooks()
    if mask is not None:
        inputs = cond.preprocess_inpaint(image, mask, Z_SIZE[0], Z_SIZE[1])
        latent = cond.latent_mask(inputs.mask, *init.shape[2:], torch.float32)
        hooks = _blend_hook(init, noise, latent, trimmed, True, skip_last=trap == "skip-last", shift=trap == "shift")
    job = DenoiseJob(_options("z-image", *Z_SIZE, steps, seed, cfg, scale), embeds[0], negative and negative[0])
    with torch.no_grad():
        return stage.run(job, hooks)


def _z_reference(z_pipe, seed, strength, cfg, mask=None):
    image, embeds, negative, _, _ = _z_inputs(z_pipe, seed, cfg)
    cls = ZImageImg2ImgPipeline if mask is None else ZImageInpaintPipeline
    pipe = cls(**z_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if mask is None else {"mask_image": mask}
    with torch.no_grad():
        return pipe(
            image=image,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            strength=strength,
            num_inference_steps=4,
            guidance_scale=Z_CFG if cfg else 0.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            **extra,
        ).images


Z_CASES = {
    "img2img-0.6-cfg": (0.6, True, False),
    "img2img-0.3-no-cfg": (0.3, False, False),
    "inpaint-0.75-cfg": (0.75, True, True),
    "inpaint-1.0-no-cfg": (1.0, False, True),
}


@pytest.mark.parametrize("case", list(Z_CASES))
def test_z_image_img2img_and_inpaint_equal_diffusers(z_pipe, monkeypatch, case):
    strength, cfg, inpaint = Z_CASES[case]
    mask = _mask(*Z_SIZE) if inpaint else None
    ref = _z_reference(z_pipe, 31, strength, cfg, mask)
    ours = _z_ours(z_pipe, monkeypatch, 31, strength, cfg, mask)
    assert ours.shape == ref.shape
    assert _max_diff(ours, ref) <= TOL
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("trap", ["skip-last", "shift", "untrimmed"])
def test_z_image_inpaint_traps_fail_the_check(z_pipe, monkeypatch, trap):
    mask = _mask(*Z_SIZE)
    ref = _z_reference(z_pipe, 32, 0.75, True, mask)
    assert _max_diff(_z_ours(z_pipe, monkeypatch, 32, 0.75, True, mask), ref) <= TOL
    assert _max_diff(_z_ours(z_pipe, monkeypatch, 32, 0.75, True, mask, trap=trap), ref) > TRAP_MIN


# ----------------------------------------------------------------------------------------- Qwen-Image
Q_SIZE = (64, 48)


def _qwen_inputs(qwen_pipe, seed, cfg, image, size, crop=None):
    vae = qwen_pipe.vae
    embeds = _randn(1, 7, tiny.QWEN_TEXT_HIDDEN, seed=seed + 1)
    negative = _randn(1, 4, tiny.QWEN_TEXT_HIDDEN, seed=seed + 2) if cfg else None
    mode = "default" if crop is None else "fill"
    pixels = cond.image_processor().preprocess(image, height=size[1], width=size[0], crops_coords=crop,
                                               resize_mode=mode).to(torch.float32)  # fmt: skip
    generator = cond.init_generator(seed)
    with torch.no_grad():
        posterior = cond.sample_posterior(vae.encode(pixels.unsqueeze(2)).latent_dist, generator)
    init = cond.normalise_qwen(posterior, vae.config.latents_mean, vae.config.latents_std)[:, :, 0]
    rows, cols = init.shape[2:]
    noise = torch.randn((1, 1, 16, rows, cols), generator=generator, dtype=torch.float32)[:, 0]
    return embeds, negative, init, noise


def _qwen_ours(qwen_pipe, monkeypatch, seed, strength, cfg, image, mask=None, crop=None, trap=None):
    embeds, negative, init, noise = _qwen_inputs(qwen_pipe, seed, cfg, image, Q_SIZE, None)
    hooks = StepHooks()
    inputs = None
    if mask is not None:
        inputs = cond.preprocess_inpaint(image, mask, *Q_SIZE, padding_mask_crop=crop)
        embeds, negative, init, noise = _qwen_inputs(qwen_pipe, seed, cfg, image, Q_SIZE, inputs.crop)
    steps = 4
    stage = qwen_image.QwenDenoiser.from_transformer(copy.deepcopy(qwen_pipe.transformer),
                                                     dict(qwen_pipe.scheduler.config))  # fmt: skip
    full = SCHEDULES[qwen_image](stage.scheduler_config, steps, *Q_SIZE)
    trimmed = full if trap == "untrimmed" else cond.trim_schedule(full, strength)
    _Seams(monkeypatch, qwen_image, init, noise, trimmed)
    if inputs is not None:
        latent = cond.latent_mask(inputs.mask, *init.shape[2:], torch.float32)
        hooks = _blend_hook(init, noise, latent, trimmed, False, skip_last=trap == "skip-last")
    job = DenoiseJob(_options("qwen-image", *Q_SIZE, steps, seed, cfg, 4.0), embeds[0], None if negative is None
                     else negative[0])  # fmt: skip
    with torch.no_grad():
        return stage.run(job, hooks)


def _qwen_reference(qwen_pipe, seed, strength, cfg, image, mask=None, crop=None, images=False):
    """The final latents (seen by the step callback, after the last blend), or with `images` the output images
    (PIL: `padding_mask_crop` accepts no other output type)."""
    embeds, negative, _, _ = _qwen_inputs(qwen_pipe, seed, cfg, image, Q_SIZE)
    cls = QwenImageImg2ImgPipeline if mask is None else QwenImageInpaintPipeline
    pipe = cls(**qwen_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if mask is None else {"mask_image": mask, "padding_mask_crop": crop}
    ones = torch.ones(embeds.shape[:2], dtype=torch.long)
    negative_kwargs = {}
    if negative is not None:
        negative_mask = torch.ones(negative.shape[:2], dtype=torch.long)
        negative_kwargs = dict(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
    final: list[torch.Tensor] = []

    def keep_latents(_pipe, _step, _t, tensors):
        final[:] = [tensors["latents"].clone()]
        return {}

    with torch.no_grad():
        result = pipe(
            image=image,
            prompt_embeds=embeds,
            prompt_embeds_mask=ones,
            strength=strength,
            num_inference_steps=4,
            true_cfg_scale=4.0,
            width=Q_SIZE[0],
            height=Q_SIZE[1],
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            callback_on_step_end=keep_latents,
            **negative_kwargs,
            **extra,
        ).images
    return result if images else final[0]


Q_CASES = {
    "img2img-0.6-cfg": (0.6, True, None),
    "img2img-0.3-no-cfg": (0.3, False, None),
    "inpaint-0.75-cfg": (0.75, True, "mask"),
    "inpaint-crop-0.9-no-cfg": (0.9, False, "crop"),
}


@pytest.mark.parametrize("case", list(Q_CASES))
def test_qwen_img2img_and_inpaint_equal_diffusers(qwen_pipe, monkeypatch, case):
    strength, cfg, kind = Q_CASES[case]
    # Another size than the output: diffusers resizes (img2img, plain inpainting) or crops and fills.
    image = _image(96, 80, seed=41)
    mask = None if kind is None else _mask(96, 80)
    crop = 4 if kind == "crop" else None
    ref = _qwen_reference(qwen_pipe, 33, strength, cfg, image, mask, crop)
    ours = _qwen_ours(qwen_pipe, monkeypatch, 33, strength, cfg, image, mask, crop)
    assert ours.shape == ref.shape
    assert _max_diff(ours, ref) <= TOL
    assert ref.abs().max() > 0.1


def test_qwen_inpaint_traps_fail_the_check(qwen_pipe, monkeypatch):
    image, mask = _image(96, 80, seed=42), _mask(96, 80)
    ref = _qwen_reference(qwen_pipe, 34, 0.75, True, image, mask)
    for trap in ("skip-last", "untrimmed"):
        assert _max_diff(_qwen_ours(qwen_pipe, monkeypatch, 34, 0.75, True, image, mask, trap=trap), ref) > TRAP_MIN


def test_qwen_padding_mask_crop_pastes_back_like_diffusers(qwen_pipe, monkeypatch):
    """The decoded crop pasted into the original: the same pixels as the pipeline's (within one level where the
    1e-5 latents round the other way), and the original's pixels outside the crop box."""
    image, mask = _image(96, 80, seed=43), _mask(96, 80)
    ref = _qwen_reference(qwen_pipe, 35, 0.9, False, image, mask, 4, images=True)[0]
    latents = _qwen_ours(qwen_pipe, monkeypatch, 35, 0.9, False, image, mask, 4)
    vae = QwenVae.from_module(qwen_pipe.vae, "qwen-image")
    with torch.no_grad():
        decoded = vae.decode(latents, *Q_SIZE)
    crop = cond.preprocess_inpaint(image, mask, *Q_SIZE, padding_mask_crop=4).crop
    assert crop is not None
    generated = cond.image_processor().postprocess(decoded, output_type="pil")
    ours = cond.paste_back(mask, image, generated, crop)[0]
    a, b = np.asarray(ours, dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert a.shape == b.shape == (80, 96, 3)
    assert np.abs(a - b).max() <= 1
    x0, y0, x1, y1 = crop
    outside = np.ones((80, 96), dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(a[outside], np.asarray(image, dtype=np.int16)[outside])


def test_control_scales_equal_qwen_controlnet_pipeline(qwen_pipe):
    """Two controls (diffusers' multi-ControlNet: one union net, two images) with different scales and windows
    that start and end mid-schedule: the scale `QwenImageControlNetPipeline` hands each control at each step
    equals `control_scales`."""
    from diffusers import QwenImageControlNetPipeline, QwenImageMultiControlNetModel

    from imagegen.common.tiny_controlnet import build_tiny_controlnet_model

    multi = QwenImageMultiControlNetModel([build_tiny_controlnet_model("qwen-image", "union")])
    pipe = QwenImageControlNetPipeline(**qwen_pipe.components, controlnet=multi)
    pipe.set_progress_bar_config(disable=True)
    seen: list[list[float]] = []
    multi.register_forward_pre_hook(lambda _m, _a, kw: seen.append(list(kw["conditioning_scale"])), with_kwargs=True)
    controls = [cond.ControlSettings(0.7, 0.2, 0.8), cond.ControlSettings(0.3, 0.0, 0.6)]
    embeds = _randn(1, 7, tiny.QWEN_TEXT_HIDDEN, seed=51)
    with torch.no_grad():
        pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            control_image=[_image(*Q_SIZE, seed=52), _image(*Q_SIZE, seed=53)],
            controlnet_conditioning_scale=[c.scale for c in controls],
            control_guidance_start=[c.start for c in controls],
            control_guidance_end=[c.end for c in controls],
            num_inference_steps=5,
            width=Q_SIZE[0],
            height=Q_SIZE[1],
            generator=torch.Generator("cpu").manual_seed(54),
            output_type="latent",
        )
    expected = cond.control_scales(5, controls)
    assert seen == expected
    assert {0.0, 0.7} <= {s[0] for s in expected} and {0.0, 0.3} <= {s[1] for s in expected}  # both windows bite
