"""Model folders: the family is read from model_index.json and every way a folder can be unusable is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from imagegen.common.checkpoint import open_model_folder, parse_dtype
from imagegen.common.errors import ModelLoadError
from imagegen.common.families.qwen_image import pipeline as qwen_pipeline
from imagegen.common.tiny import tiny_checkpoint_cached


@pytest.fixture
def qwen_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_checkpoint_cached("qwen-image"), target)
    return target


@pytest.mark.parametrize(
    ("family", "variant"),
    [("qwen-image", None), ("qwen-image-edit", None), ("qwen-image-edit-plus", "2511"), ("z-image", "turbo")],
)
def test_family_is_read_from_model_index(family: str, variant: str | None) -> None:
    assert open_model_folder(tiny_checkpoint_cached(family, variant)).family == family


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="model folder not found"):
        open_model_folder(tmp_path / "nope")


def test_missing_model_index(qwen_copy) -> None:
    (qwen_copy / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing file: .*model_index.json"):
        open_model_folder(qwen_copy)


def test_unknown_family(qwen_copy) -> None:
    index = json.loads((qwen_copy / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (qwen_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unknown model family.*FluxPipeline"):
        open_model_folder(qwen_copy)


def test_unsupported_component_class(qwen_copy) -> None:
    index = json.loads((qwen_copy / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (qwen_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported class 'FluxTransformer2DModel'"):
        open_model_folder(qwen_copy).load("transformer")


def test_missing_weights(qwen_copy) -> None:
    for file in (qwen_copy / "transformer").glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(ModelLoadError, match=r"missing weights: no \*.safetensors file in .*transformer"):
        open_model_folder(qwen_copy).load("transformer")


def test_missing_component_folder(qwen_copy) -> None:
    shutil.rmtree(qwen_copy / "vae")
    with pytest.raises(ModelLoadError, match=r"missing component folder: .*vae"):
        open_model_folder(qwen_copy).load("vae")


@pytest.mark.parametrize("dtype", ["float16", "int8", "fp32"])
def test_unsupported_dtype(dtype: str) -> None:
    with pytest.raises(ModelLoadError, match=f"unsupported dtype '{dtype}'"):
        parse_dtype(dtype)


def test_revision_changes_with_contents(qwen_copy) -> None:
    folder = open_model_folder(qwen_copy)
    before = folder.revision(("text_encoder", "tokenizer"))
    config = qwen_copy / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace("}", ', "edited": true}', 1))
    assert open_model_folder(qwen_copy).revision(("text_encoder", "tokenizer")) != before


def test_vision_rotary_stays_float32_in_bf16() -> None:
    """Loading the VL encoder in bf16 must not quantise its rotary frequencies (accuracy.md 3.2)."""
    folder = open_model_folder(tiny_checkpoint_cached("qwen-image-edit"))
    encoder = qwen_pipeline.QwenTextEncoder(folder, torch.bfloat16, "cpu")
    rotaries = [m for m in encoder.model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    assert any("Vision" in type(m).__name__ for m in rotaries)
    assert all(m.inv_freq.dtype == torch.float32 for m in rotaries)
    assert encoder.model.dtype == torch.bfloat16
