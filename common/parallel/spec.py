"""`GroupSpec`: everything the ranks of one denoiser group must agree on, in one frozen value.

Built once from the flags (`GroupSpec.from_flags`) and handed whole to every rank: rank 0 (`group_denoiser`,
`local_group`), the worker processes it spawns (as one JSON argument) and torchrun's other ranks
(`follow_as_rank`). A rank therefore cannot form another layout than rank 0 because a caller forgot one value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from imagegen.common.checkpoint import open_model_folder
from imagegen.common.parallel.group import DEFAULT_TIMEOUT_S
from imagegen.common.parallel.layout import SequenceParallelLayout, choose_layout
from imagegen.common.parallel.usp import MERGES
from imagegen.common.stage_settings import StageSettings


@dataclass(frozen=True)
class GroupSpec:
    model: str  # the diffusers-format folder every rank loads
    sp: int = 1  # sequence-parallel degree P
    cfg_parallel: bool = False  # the two CFG branches on separate ranks (world = 2P)
    ulysses: int | None = None  # Ulysses degree U of P = U x R; None: the largest dividing P and the heads
    dtype: str = "float32"
    device: str = "cpu"  # the device type; each rank takes its own index (LOCAL_RANK)
    timeout_s: float = DEFAULT_TIMEOUT_S  # every collective's, so a dead or hung rank fails the group
    threads: int = 0  # torch intra-op threads of spawned ranks (0: torch's default)
    stage: StageSettings = StageSettings()  # how each rank's denoise stage runs (kernels, compile, graphs, ...)
    ring_merge: str = "ordered"  # how ring attention merges its blocks (`imagegen.common.parallel.usp`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))  # a Path is accepted, and stays JSON-able
        if self.ring_merge not in MERGES:
            raise ValueError(f"ring merge {self.ring_merge!r}: expected one of {', '.join(MERGES)}")

    @classmethod
    def from_flags(
        cls, args: argparse.Namespace, model: str | Path, dtype: str, device: str, stage: StageSettings
    ) -> GroupSpec:
        """The spec of the `--sp/--ulysses/--cfg-parallel/--collective-timeout/--torch-threads/--ring-merge`
        flags (`imagegen generate` and `serve denoiser` both have them), for the model, dtype, device and stage
        settings the caller has already resolved."""
        return cls(
            model=str(model),
            sp=args.sp,
            cfg_parallel=args.cfg_parallel,
            ulysses=args.ulysses,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            timeout_s=args.collective_timeout,
            threads=args.torch_threads,
            stage=stage,
            ring_merge=args.ring_merge,
        )

    @property
    def world(self) -> int:
        return self.sp * (2 if self.cfg_parallel else 1)

    def layout(self) -> SequenceParallelLayout:
        """The Ulysses x ring split of P for this model (`LayoutError` naming the valid ones if impossible)."""
        return choose_layout(self.sp, transformer_heads(self.model), self.ulysses)

    def resolved(self) -> GroupSpec:
        """This spec with U fixed to the layout it resolves to (what rank 0 hands the ranks it spawns)."""
        return dataclasses.replace(self, ulysses=self.layout().ulysses)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GroupSpec:
        values = json.loads(text)
        return cls(**{**values, "stage": StageSettings.from_dict(values["stage"])})


def transformer_heads(model: str | Path) -> int:
    config = open_model_folder(model).config("transformer")
    return int(config.get("num_attention_heads") or config["n_heads"])
