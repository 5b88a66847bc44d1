"""Diffusers-format model folders: which family, and each component loaded with its own `from_pretrained`.

A folder is `model_index.json` plus one subfolder per component, exactly as the published Qwen-Image,
Qwen-Image-Edit(-2509/-2511) and Z-Image(-Turbo) repositories are laid out. The family is read from the
pipeline class named in `model_index.json`. Services load only the components their stage needs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagegen.common.errors import ModelLoadError
from imagegen.common.families import FAMILY_BY_PIPELINE, SUPPORTED_CLASSES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TORCH_MODELS = {"transformer", "vae", "text_encoder"}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """A torch device that exists on this machine; `cuda` without a usable GPU is refused up front."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {name!r}: use cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but no CUDA GPU is available")
    if device.type not in {"cpu", "cuda"}:
        raise ModelLoadError(f"unsupported device {name!r}: use cpu or cuda")
    return device


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    family: str
    index: dict[str, Any]

    def component_class(self, name: str) -> tuple[str, str]:
        entry = self.index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ModelLoadError(f"{self.path / 'model_index.json'}: no component {name!r}")
        return entry[0], entry[1]

    def config(self, name: str, filename: str = "config.json") -> dict[str, Any]:
        return _read_json(self.path / name / filename)

    def scheduler_config(self) -> dict[str, Any]:
        return self.config("scheduler", "scheduler_config.json")

    def load(self, name: str, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu") -> Any:
        """Load one component with its library's `from_pretrained`; torch models get `dtype` and `device`."""
        library, class_name = self.component_class(name)
        allowed = SUPPORTED_CLASSES[self.family].get(name)
        if allowed is not None and class_name not in allowed:
            raise ModelLoadError(
                f"{self.path / 'model_index.json'}: component {name!r} has unsupported class {class_name!r} "
                f"for family {self.family} (supported: {', '.join(sorted(allowed))})"
            )
        folder = self.path / name
        _check_component_files(folder, name)
        cls = _import_class(library, class_name)
        try:
            if name in _TORCH_MODELS:
                model = cls.from_pretrained(folder, dtype=parse_dtype(dtype))
                return model.to(device).eval()
            return cls.from_pretrained(folder)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder}: cannot load {class_name}: {exc}") from exc

    def with_modules(self, modules: dict[str, Any]) -> ModelFolder:
        """This folder, except that `load(name)` returns `modules[name]` where given: stages built on it share
        those objects (benchmarks hand the same full-size random-weight modules to diffusers and to us)."""
        return _PrebuiltFolder(self.path, self.family, self.index, dict(modules))

    def revision(self, components: tuple[str, ...]) -> str:
        """A short digest naming these components' contents (configs verbatim, weight files by name and size).

        Cheap enough to compute at start-up, and it changes when a checkpoint is replaced in place.
        """
        digest = hashlib.sha256(json.dumps(self.index, sort_keys=True).encode())
        for name in components:
            for file in sorted((self.path / name).rglob("*")):
                if not file.is_file():
                    continue
                digest.update(str(file.relative_to(self.path)).encode())
                if file.suffix == ".json" or file.suffix in {".txt", ".jinja", ".model"}:
                    digest.update(file.read_bytes())
                else:
                    digest.update(str(file.stat().st_size).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _PrebuiltFolder(ModelFolder):
    prebuilt: dict[str, Any] = field(default_factory=dict, compare=False)

    def load(self, name: str, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu") -> Any:
        if name in self.prebuilt:
            return self.prebuilt[name]
        return super().load(name, dtype, device)


def quiet_hub_progress() -> None:
    """Loading bars of transformers/diffusers are noise in CLI output and service logs."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def open_model_folder(path: str | Path) -> ModelFolder:
    """Read `model_index.json` and find the family; errors name the file or class at fault."""
    quiet_hub_progress()
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    index = _read_json(path / "model_index.json")
    pipeline = index.get("_class_name")
    family = FAMILY_BY_PIPELINE.get(pipeline)
    if family is None:
        raise ModelLoadError(
            f"{path / 'model_index.json'}: unknown model family (pipeline class {pipeline!r}; supported: "
            f"{', '.join(sorted(FAMILY_BY_PIPELINE))})"
        )
    return ModelFolder(path, family, index)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ModelLoadError(f"missing file: {file}")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file}: not readable JSON ({exc})") from exc


def _check_component_files(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder: {folder}")
    if name == "scheduler":
        _read_json(folder / "scheduler_config.json")
    elif name in _TORCH_MODELS:
        _read_json(folder / "config.json")
        if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir()):
            raise ModelLoadError(f"missing weights: no *.safetensors file in {folder}")


def _import_class(library: str, class_name: str) -> type:
    if library not in {"diffusers", "transformers"}:
        raise ModelLoadError(f"unsupported library {library!r} for class {class_name!r}")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelLoadError(f"class {class_name!r} not found in {library}")
    return cls
