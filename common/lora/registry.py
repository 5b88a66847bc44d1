"""Where adapters come from (`LoraRegistry`: a read-only `--lora-dir`) and where loaded ones are kept
(`AdapterCache`: an LRU on the denoiser's device, bounded in bytes).

A directory holds `NAME.safetensors` (the adapter, named by its stem) and optionally `NAME.json`: default
request options for that adapter (`steps`, `guidance_scale`), so a distilled adapter works with one request
that sets nothing else, and `scheduler_shift`: a static shift of the sigmas (the scheduler config's `shift`
with `use_dynamic_shifting` off, as distilled adapters are run in diffusers) whenever the adapter is in a job's
set. Names are plain file stems; a request can never reach outside the directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from imagegen.common.errors import InvalidArgument
from imagegen.common.lora.files import Adapter, AdapterError, check_fits, read_adapter
from imagegen.common.stage_settings import DEFAULT_LORA_CACHE_MB

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_LORAS = 8  # adapters in one request
MAX_SCALE = 16.0  # |scale|; diffusers takes any float, a larger one is a typo, not a style
DEFAULT_KEYS = {"steps": int, "guidance_scale": float, "scheduler_shift": float}
REQUEST_DEFAULT_KEYS = ("steps", "guidance_scale")  # the RequestOptions fields NAME.json may default


@dataclass(frozen=True)
class LoraDefaults:
    """Request options an adapter brings (NAME.json); a request's own value always wins."""

    steps: int | None = None
    guidance_scale: float | None = None
    scheduler_shift: float | None = None  # applied by the denoiser (it is part of the adapter set's schedule)


def check_lora_name(name: str, field: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = str(name)[:64]  # a caller's string: echoed short
        raise InvalidArgument(field, f"must be an adapter name (letters, digits, '.', '_', '-'), got {shown!r}")


def check_lora_scales(weights: Sequence[tuple[str, float]], prefix: str = "loras") -> None:
    """Count, duplicates and scales of a request's adapters (names may be CLI paths here)."""
    if len(weights) > MAX_LORAS:
        raise InvalidArgument(prefix, f"at most {MAX_LORAS} adapters per request, got {len(weights)}")
    seen = set()
    for index, (name, scale) in enumerate(weights):
        if name in seen:
            raise InvalidArgument(f"{prefix}[{index}].name", f"{name[:64]!r} is given twice")
        seen.add(name)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise InvalidArgument(f"{prefix}[{index}].scale", f"must be a finite number, got {scale!r}")
        if abs(scale) > MAX_SCALE:
            raise InvalidArgument(
                f"{prefix}[{index}].scale", f"must be between -{MAX_SCALE} and {MAX_SCALE}, got {scale}"
            )


def parse_lora(value: str, index: int = 0) -> tuple[str, float]:
    """The CLI's `--lora NAME_OR_PATH[:SCALE]` -> (name or path, scale); a suffix that is not a number belongs
    to the name (a path may hold colons)."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    if not value:
        raise InvalidArgument(f"lora[{index}]", "is empty")
    return value, 1.0


def check_lora_weights(weights: Sequence[tuple[str, float]], prefix: str = "loras") -> None:
    """A served request's adapters: registry names (never paths), scales and count; not whether they exist."""
    for index, (name, _) in enumerate(weights):
        check_lora_name(name, f"{prefix}[{index}].name")
    check_lora_scales(weights, prefix)


class LoraRegistry:
    """The adapters of one directory (None: no directory, every name is unknown)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise InvalidArgument("lora_dir", f"{root} is not a directory")

    def names(self) -> list[str]:
        if self.root is None:
            return []
        return sorted(p.stem for p in self.root.glob("*.safetensors") if NAME_PATTERN.fullmatch(p.stem))

    def path(self, name: str, field: str) -> Path:
        check_lora_name(name, field)
        path = self.root / f"{name}.safetensors" if self.root is not None else None
        if path is None or not path.is_file():
            known = ", ".join(self.names()[:20]) or "none"
            raise InvalidArgument(field, f"unknown adapter {name!r} (this denoiser has: {known})")
        return path

    def defaults(self, name: str) -> LoraDefaults:
        """NAME.json's request defaults; a malformed file is the deployment's error (ValueError)."""
        if self.root is None:
            return LoraDefaults()
        return read_defaults(self.root / f"{name}.json")


def read_defaults(path: Path) -> LoraDefaults:
    if not path.is_file():
        return LoraDefaults()
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    values = {}
    for key, kind in DEFAULT_KEYS.items():
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise ValueError(f"{path}: {key} must be a number, got {value!r}")
            values[key] = kind(value)
    shift = values.get("scheduler_shift")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{path}: scheduler_shift must be a positive number, got {shift}")
    return LoraDefaults(**values)


def resolve_source(spec: str, registry: LoraRegistry | None, field: str) -> Path:
    """A CLI `--lora` value: a registry name, else a path to a .safetensors file."""
    if registry is not None and registry.root is not None and NAME_PATTERN.fullmatch(spec):
        candidate = registry.root / f"{spec}.safetensors"
        if candidate.is_file():
            return candidate
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return path
    raise InvalidArgument(field, f"{spec!r} is neither an adapter of --lora-dir nor a .safetensors file")


class AdapterCache:
    """Adapters loaded for one transformer, on its device, least recently used dropped first once the total
    passes `max_bytes`. Keyed by file and its (mtime, size): a replaced file is read again. Thread-safe (the
    denoiser loads while validating requests, next to the running job)."""

    def __init__(self, transformer: torch.nn.Module, family: str, max_bytes: int = DEFAULT_LORA_CACHE_MB << 20) -> None:
        self.transformer = transformer
        self.family = family
        self.max_bytes = max_bytes  # `--lora-cache-mb` (StageSettings.lora_cache_bytes)
        self._entries: OrderedDict[tuple, Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def key(self, path: str | Path) -> tuple:
        path = Path(path).resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            raise AdapterError(f"{path.name}: {exc.strerror or exc}") from exc
        return (str(path), stat.st_mtime_ns, stat.st_size)

    def get(self, path: str | Path, label: str | None = None) -> Adapter:
        """The adapter at `path`, loaded, checked against the transformer and moved to its device once."""
        key = self.key(path)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            adapter = read_adapter(key[0], self.family)
            try:
                defaults = read_defaults(Path(key[0]).with_suffix(".json"))
            except ValueError as exc:  # also json.JSONDecodeError
                raise AdapterError(f"{Path(key[0]).stem}.json: {exc}") from exc
            adapter = dataclasses.replace(adapter, scheduler_shift=defaults.scheduler_shift)
            check_fits(adapter, self.transformer, label or Path(key[0]).name)
            if adapter.nbytes > self.max_bytes:
                raise AdapterError(
                    f"{Path(key[0]).name}: {adapter.nbytes} bytes; the adapter cache holds {self.max_bytes}"
                )
            device = next(self.transformer.parameters()).device
            adapter = adapter.to(device)
            self._entries[key] = adapter
            self.loads += 1
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
            return adapter


def with_lora_defaults(options, defaults: Sequence[LoraDefaults]):
    """`options` (RequestOptions) with unset steps / guidance_scale taken from the first adapter whose
    NAME.json sets them (a distilled adapter brings its own step count)."""
    changes = {}
    for key in REQUEST_DEFAULT_KEYS:
        if getattr(options, key) is None:
            value = next((getattr(d, key) for d in defaults if getattr(d, key) is not None), None)
            if value is not None:
                changes[key] = value
    return dataclasses.replace(options, **changes) if changes else options
