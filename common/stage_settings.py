"""`StageSettings`: how a denoise stage runs, chosen once at start-up and handed to it (and, inside a `GroupSpec`,
to every rank of its group) instead of being read from the environment where it is used.

The flag layer (`imagegen.services.flags`, the CLI) reads the `IMAGEGEN_*` variables; nothing below it does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LORA_CACHE_MB = 4096
COLLECTIVE_TIMEOUT_S = 300.0  # every collective of a denoiser group: a dead or hung rank fails it after this
# Where compile markers, inductor's caches and the tiny demo checkpoints live unless --cache-dir/IMAGEGEN_CACHE
# say otherwise (the container image sets IMAGEGEN_CACHE=/cache/imagegen).
DEFAULT_CACHE_ROOT = str(Path.home() / ".cache" / "imagegen")


@dataclass(frozen=True)
class StageSettings:
    kernels: str | None = None  # fast or reference; None: fast on cuda, reference elsewhere (`resolve_kernels`)
    compile: str | None = None  # on, off or auto; None: auto
    cuda_graphs: bool = True  # replay the fast path's forwards as CUDA graphs (on cuda only)
    lora_cache_bytes: int = DEFAULT_LORA_CACHE_MB << 20  # loaded adapters kept on the device (`AdapterCache`)
    cache_root: str = DEFAULT_CACHE_ROOT  # compile markers (`CompileMarker`)

    @classmethod
    def from_dict(cls, values: dict) -> StageSettings:
        return cls(**values)

    def replace(self, **changes) -> StageSettings:
        return dataclasses.replace(self, **changes)
