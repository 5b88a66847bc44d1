"""One LoRA file -> the per-linear factors and scalings diffusers' `load_lora_weights` would install.

The community formats (kohya `lora_unet_*`, `diffusion_model.*`, `.alpha` keys, ComfyUI `default.`) go through
the pipelines' own `lora_state_dict`, so what we read is exactly the state dict diffusers hands PEFT; the
scaling of each linear is PEFT's `lora_alpha / r` from the file's `lora_adapter_metadata` (alpha_pattern,
rank_pattern, use_rslora), and 1 without metadata (the converters fold alphas into the weights). Files are read
with safetensors only: no pickle, ever.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from imagegen.common.families import get_family

PREFIX = "transformer."  # diffusers loads only these keys for these pipelines (`_lora_loadable_modules`)
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


class AdapterError(ValueError):
    """The file is not a LoRA these pipelines load, or it does not fit the loaded transformer."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear: `y = W x + b + scale * scaling * (up @ down) x (+ scale * scaling * up_bias)`."""

    down: torch.Tensor  # lora_A [r, in]
    up: torch.Tensor  # lora_B [out, r]
    scaling: float  # PEFT's lora_alpha / r (or / sqrt(r) with use_rslora)
    up_bias: torch.Tensor | None = None  # lora_B bias (PEFT's lora_bias)

    @property
    def nbytes(self) -> int:
        tensors = [self.down, self.up] + ([self.up_bias] if self.up_bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: its file and, per module path inside the transformer, its factors."""

    source: str
    layers: dict[str, LoraLayer]
    scheduler_shift: float | None = None  # NAME.json's static shift for the schedule while this adapter is set

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    def to(self, device: torch.device | str) -> Adapter:
        layers = {
            name: LoraLayer(
                layer.down.to(device),
                layer.up.to(device),
                layer.scaling,
                None if layer.up_bias is None else layer.up_bias.to(device),
            )
            for name, layer in self.layers.items()
        }
        return Adapter(self.source, layers, self.scheduler_shift)


def _loader(family: str):
    """The diffusers mixin whose `lora_state_dict` converts community formats for `family`."""
    from diffusers.loaders import lora_pipeline

    return getattr(lora_pipeline, get_family(family).lora_loader)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The file's tensors and its diffusers adapter metadata (None when absent)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path.name}: adapters are .safetensors files")
    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, "pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    raw = header.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path.name}: {METADATA_KEY} is not JSON ({exc})") from exc
    return tensors, metadata


def read_adapter(path: str | Path, family: str) -> Adapter:
    """`path` as diffusers would load it into `family`'s transformer (not yet checked against one)."""
    tensors, metadata = read_tensors(path)
    name = Path(path).name
    if not tensors:
        raise AdapterError(f"{name}: holds no tensors")
    try:
        state = _loader(family).lora_state_dict(dict(tensors))  # a dict: diffusers reads no file itself
    except Exception as exc:  # the converters raise ValueError/KeyError/... on keys they do not know
        raise AdapterError(f"{name}: not a LoRA format diffusers loads for {family} ({exc})") from exc
    if any(".lokr_" in k for k in state):
        raise AdapterError(f"{name}: LoKr adapters are not supported, only LoRA")
    if not all("lora" in k for k in state):
        raise AdapterError(f"{name}: not a LoRA checkpoint (keys without 'lora', e.g. {_first(state, 'lora')})")
    state = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    if not state:
        raise AdapterError(f"{name}: no transformer weights (diffusers loads only '{PREFIX}*' keys)")
    if metadata is not None:
        metadata = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)} or None
    if "lora_A" not in next(iter(state)):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)  # lora.down/lora.up -> lora_A/lora_B, as diffusers does
    if any("lora_magnitude_vector" in k for k in state):
        raise AdapterError(f"{name}: DoRA adapters are not supported, only LoRA")
    return Adapter(str(Path(path).resolve()), _layers(name, state, metadata))


def _layers(name: str, state: dict[str, torch.Tensor], metadata: dict | None) -> dict[str, LoraLayer]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, sep, part = key.partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            raise AdapterError(f"{name}: unexpected key {key!r}")
        modules.setdefault(module, {})[part] = value
    config = _Config.from_metadata(metadata)
    layers = {}
    for module, parts in sorted(modules.items()):
        if "A.weight" not in parts or "B.weight" not in parts:
            raise AdapterError(f"{name}: {module} needs both lora_A and lora_B weights")
        down, up = parts["A.weight"], parts["B.weight"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise AdapterError(
                f"{name}: {module} lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are not one low-rank pair"
            )
        if not config.targets(module):
            continue  # PEFT injects no layer for a module outside target_modules: its weights go unused
        scaling = config.scaling(name, module, down.shape[0])
        layers[module] = LoraLayer(down, up, scaling, parts.get("B.bias"))
    if not layers:
        raise AdapterError(f"{name}: no layer of the adapter is in its target_modules")
    return layers


@dataclass(frozen=True)
class _Config:
    """The part of PEFT's LoraConfig that decides a layer's scaling; defaults as `get_peft_kwargs` derives
    them for a file without metadata (alpha = rank everywhere: scaling 1)."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    use_rslora: bool = False
    target_modules: list[str] | str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> _Config:
        if metadata is None:
            return cls()
        # LoraConfig's own defaults (r=8, lora_alpha=8) when the metadata leaves them out.
        return cls(
            int(metadata.get("r", 8)),
            float(metadata.get("lora_alpha", 8)),
            metadata.get("rank_pattern") or {},
            metadata.get("alpha_pattern") or {},
            bool(metadata.get("use_rslora", False)),
            metadata.get("target_modules"),
        )

    def targets(self, module: str) -> bool:
        targets = self.target_modules
        if targets is None:
            return True
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, module) is not None
        return any(module == t or module.endswith(f".{t}") for t in targets)

    def scaling(self, name: str, module: str, rank: int) -> float:
        if self.r is None:
            return 1.0
        expected = int(_pattern(self.rank_pattern, module, self.r))
        if expected != rank:
            raise AdapterError(f"{name}: {module} has rank {rank}, its metadata says {expected}")
        alpha = float(_pattern(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _first(state: dict, missing: str) -> str:
    return next((k for k in state if missing not in k), "")


def check_fits(adapter: Adapter, transformer: torch.nn.Module, label: str) -> None:
    """Every adapted module is a linear of the transformer with the factors' in/out sizes."""
    for module, layer in adapter.layers.items():
        try:
            linear = transformer.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{label}: the model has no module {module!r}") from None
        if not isinstance(linear, torch.nn.Linear):
            raise AdapterError(f"{label}: {module} is a {type(linear).__name__}, not a Linear")
        want = (linear.out_features, linear.in_features)
        got = (layer.up.shape[0], layer.down.shape[1])
        if got != want:
            raise AdapterError(
                f"{label}: {module} is {want[0]}x{want[1]} in the model, {got[0]}x{got[1]} in the adapter"
            )
        if layer.up_bias is not None and layer.up_bias.shape != (want[0],):
            raise AdapterError(f"{label}: {module} lora_B bias has shape {tuple(layer.up_bias.shape)}")
        for tensor in (layer.down, layer.up):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{label}: {module} holds non-finite or non-float values")
