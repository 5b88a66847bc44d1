"""What a model-hosting service (encoder, denoiser, VAE) shares: opening the folder from its flags, pinning
torch threads, one compute thread, and the `Describe` answer."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from imagegen.common.checkpoint import ModelFolder, open_model_folder, parse_device, parse_dtype
from imagegen.common.errors import ModelLoadError
from imagegen.common.families import Family, get_family
from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.handlers import QueueFull
from imagegen.v1 import common_pb2

# `from_pretrained` (diffusers and transformers) patches torch globally while it builds a model on the meta
# device, so two loads in one process (`serve all`) must not overlap.
LOAD_LOCK = threading.Lock()


def pin_torch_threads(threads: int) -> None:
    """0 keeps torch's default; a fixed count makes CPU float results reproducible across processes. One-time
    process configuration at start-up, before any stage runs (the intra-op pool is process-wide). Grad mode is
    not set here: it is per thread, and every stage entry point runs under `torch.no_grad` itself."""
    if threads:
        torch.set_num_threads(threads)


@dataclass
class HostedModel:
    folder: ModelFolder
    family: Family
    model_id: str
    dtype: torch.dtype
    device: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HostedModel:
        if not args.model:
            raise ConfigError("--model (or IMAGEGEN_MODEL) is required")
        folder = open_model_folder(args.model)
        device = str(parse_device(args.device))  # refuses cuda without a GPU before any port opens
        dtype = parse_dtype(args.dtype or ("float32" if device == "cpu" else "bfloat16"))
        model_id = args.model_id or Path(args.model).resolve().name
        return cls(folder, get_family(folder.family), model_id, dtype, device)

    def load(self, stage: Callable) -> object:
        """Construct a stage class (`family.text_encoder`, `.vae`, `.denoiser`, or a factory) on this model."""
        with LOAD_LOCK:
            try:
                return stage(self.folder, self.dtype, self.device)
            except ValueError as exc:  # e.g. an unsupported transformer variant: one line, not a traceback
                raise ModelLoadError(f"{self.folder.path}: {exc}") from exc

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def info(self, components: tuple[str, ...], reads_cache: bool = False) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model_id=self.model_id,
            family=self.family.name,
            revision=self.folder.revision(components),
            template_version=self.family.template_version,
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device,
            reads_cache=reads_cache,
        )


COMPUTE_BACKLOG = 64  # calls that may wait for a stage's compute thread; more answer RESOURCE_EXHAUSTED


class ComputeThread(ThreadPoolExecutor):
    """One thread runs the model: torch ops already use every core, and one at a time keeps memory bounded. At
    most `backlog` calls wait for it; more raise `QueueFull` (RESOURCE_EXHAUSTED with a retry hint), so an
    overloaded stage sheds load instead of queueing without bound."""

    def __init__(self, name: str, backlog: int = COMPUTE_BACKLOG) -> None:
        super().__init__(max_workers=1, thread_name_prefix=name)
        self.name = name
        self.backlog = backlog
        self._waiting = 0
        self._lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._waiting >= self.backlog:
                raise QueueFull(f"{self.name}: {self.backlog} calls are already waiting")
            self._waiting += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self._waiting -= 1
