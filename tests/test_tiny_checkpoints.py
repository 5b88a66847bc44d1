"""Tiny checkpoints: they save, reload offline bit-identically, run with the real diffusers pipelines, are
deterministic, and are sensitive to the prompt."""

from __future__ import annotations

import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    ZImagePipeline,
)
from PIL import Image

from imagegen.common import tiny

Case = tuple[str, str | None]
CASES: list[Case] = [
    ("qwen-image", None),
    ("qwen-image-edit", None),
    ("qwen-image-edit-plus", None),
    ("qwen-image-edit-plus", "2511"),
    ("z-image", None),
    ("z-image", "turbo"),
]
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "qwen-image": QwenImagePipeline,
    "qwen-image-edit": QwenImageEditPipeline,
    "qwen-image-edit-plus": QwenImageEditPlusPipeline,
    "z-image": ZImagePipeline,
}
TORCH_MODULES = ("text_encoder", "transformer", "vae")
PROMPT = "a red fox in the snow"


def _case_id(case: Case) -> str:
    return case[0] + (f"-{case[1]}" if case[1] else "")


all_cases = pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])


@pytest.fixture(scope="module", autouse=True)
def _pinned_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[Case, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {case: tiny.build_tiny_checkpoint(case[0], root / _case_id(case), variant=case[1]) for case in CASES}


@pytest.fixture(scope="session")
def pipelines(checkpoint_dirs) -> dict[Case, DiffusionPipeline]:
    return {case: _load(case[0], path) for case, path in checkpoint_dirs.items()}


def _load(family: str, path: pathlib.Path) -> DiffusionPipeline:
    pipe = PIPELINE_CLASSES[family].from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _family_kwargs(case: Case) -> dict:
    family, variant = case
    if family == "qwen-image-edit":
        return {"image": _random_image(40, 56, 0)}
    if family == "qwen-image-edit-plus":
        return {"image": [_random_image(40, 56, 0), _random_image(72, 48, 1)]}
    if family == "z-image":
        # Base runs with CFG (batched pos/neg), Turbo without: both transformer paths are exercised.
        return {"guidance_scale": 0.0} if variant == "turbo" else {"guidance_scale": 5.0, "negative_prompt": "blurry"}
    return {}


def _run(pipe: DiffusionPipeline, case: Case, prompt: str, **extra) -> np.ndarray:
    kwargs = {**_family_kwargs(case), **extra}
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        out = pipe(
            prompt=prompt, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np", **kwargs
        )
    return out.images


@pytest.fixture(scope="session")
def first_outputs() -> dict[Case, np.ndarray]:
    """Outputs for PROMPT, shared between tests: each Edit run VAE-encodes ~1 MP per image, the slow part."""
    return {}


def _first(pipelines, first_outputs, case: Case) -> np.ndarray:
    if case not in first_outputs:
        first_outputs[case] = _run(pipelines[case], case, PROMPT)
    return first_outputs[case]


@all_cases
def test_runs_deterministic_and_prompt_sensitive(pipelines, first_outputs, case):
    first = _first(pipelines, first_outputs, case)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert first.std() > 0.05, "decoded image is nearly constant"
    assert np.array_equal(first, _run(pipelines[case], case, PROMPT))
    assert np.abs(first - _run(pipelines[case], case, "a blue boat on the lake")).max() > 1e-3


def test_zero_cond_t_changes_output(pipelines, first_outputs):
    edit_2509 = _first(pipelines, first_outputs, ("qwen-image-edit-plus", None))
    edit_2511 = _first(pipelines, first_outputs, ("qwen-image-edit-plus", "2511"))
    assert np.abs(edit_2509 - edit_2511).max() > 1e-3


def test_qwen_image_true_cfg(pipelines, first_outputs):
    case = ("qwen-image", None)
    plain = _first(pipelines, first_outputs, case)
    guided = _run(pipelines[case], case, PROMPT, negative_prompt=" ", true_cfg_scale=4.0)
    assert guided.shape == (1, 64, 64, 3) and np.isfinite(guided).all()
    assert np.abs(guided - plain).max() > 1e-3


@pytest.mark.parametrize(
    ("family", "expected"), [("qwen-image", 34), ("qwen-image-edit", 64), ("qwen-image-edit-plus", 64)]
)
def test_template_token_counts(pipelines, family, expected):
    pipe = pipelines[(family, None)]
    assert pipe.prompt_template_encode_start_idx == expected
    assert tiny.check_template_token_counts(pipe) == expected


def test_edit_vision_tokens_follow_dropped_prefix(pipelines):
    pipe = pipelines[("qwen-image-edit", None)]
    text = pipe.prompt_template_encode.format("make it blue")
    # The pipeline hands the processor its ~1 MP resized image; the saved max_pixels must bound the token count.
    inputs = pipe.processor(text=[text], images=[_random_image(1024, 1024, 0)], return_tensors="pt")
    tokens = pipe.processor.tokenizer.convert_ids_to_tokens(inputs.input_ids[0].tolist())
    assert tokens[64] == "<|vision_start|>"
    assert 4 <= tokens.count("<|image_pad|>") <= 64


@all_cases
def test_reload_is_bit_identical(pipelines, case):
    built = tiny.build_tiny_pipeline(case[0], variant=case[1])
    loaded = pipelines[case]
    for name in TORCH_MODULES:
        expected, actual = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys(), name
        for key, tensor in expected.items():
            assert actual[key].dtype == torch.float32, f"{name}.{key}"
            assert torch.equal(tensor, actual[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_build_is_deterministic_per_seed(tmp_path, family):
    first = tiny.build_tiny_checkpoint(family, tmp_path / "a", seed=3)
    second = tiny.build_tiny_checkpoint(family, tmp_path / "b", seed=3)
    other = tiny.build_tiny_checkpoint(family, tmp_path / "c", seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() != (other / weights).read_bytes()


def test_variant_configs(pipelines):
    qwen = pipelines[("qwen-image", None)].scheduler.config
    assert (qwen.use_dynamic_shifting, qwen.time_shift_type, qwen.shift_terminal) == (True, "exponential", 0.02)
    assert (qwen.base_shift, qwen.max_shift, qwen.base_image_seq_len, qwen.max_image_seq_len) == (0.5, 0.9, 256, 8192)
    assert pipelines[("qwen-image-edit-plus", None)].transformer.config.zero_cond_t is False
    assert pipelines[("qwen-image-edit-plus", "2511")].transformer.config.zero_cond_t is True
    for variant, shift in ((None, 6.0), ("turbo", 3.0)):
        config = pipelines[("z-image", variant)].scheduler.config
        assert (config.use_dynamic_shifting, config.shift) == (False, shift)
    assert pipelines[("z-image", None)].vae.config.scaling_factor == 0.3611
    assert pipelines[("z-image", None)].vae_scale_factor == 8
    assert pipelines[("qwen-image", None)].vae_scale_factor == 8


@pytest.mark.parametrize(("family", "variant"), [("flux", None), ("z-image", "2511"), ("qwen-image", "turbo")])
def test_unknown_family_or_variant_raises(tmp_path, family, variant):
    with pytest.raises(ValueError, match=family):
        tiny.build_tiny_checkpoint(family, tmp_path, variant=variant)


def test_z_image_chat_template_thinking_switch(pipelines):
    tokenizer = pipelines[("z-image", None)].tokenizer
    messages = [{"role": "user", "content": "hi"}]

    def render(thinking: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )

    assert render(True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(False) == render(True) + "<think>\n\n</think>\n\n"


def test_any_text_tokenizes_and_round_trips(pipelines):
    tokenizer = pipelines[("qwen-image", None)].tokenizer
    text = "Zebra über 东京 🦊 tab\there"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer.tokenize(" the snow")) == 2


@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_vae_decodes_noise_with_healthy_spread(pipelines, family):
    image = tiny.decode_noise(pipelines[(family, None)])
    assert torch.isfinite(image).all()
    assert 0.1 < image.std().item() < 0.8
    assert (image.abs() >= 1.0).float().mean().item() < 0.25


def test_cached_build_is_reused_and_race_safe(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        paths = list(
            pool.map(lambda _: tiny.tiny_checkpoint_cached("z-image", "turbo", cache_dir=str(tmp_path)), [0, 1])
        )
    assert paths[0] == paths[1] == tmp_path / f"z-image-turbo-s0-v{tiny.BUILDER_VERSION}"
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name], "temporary build folders left behind"
    stamp = (paths[0] / "model_index.json").stat().st_mtime_ns
    assert tiny.tiny_checkpoint_cached("z-image", "turbo", cache_dir=str(tmp_path)) == paths[0]
    assert (paths[0] / "model_index.json").stat().st_mtime_ns == stamp
