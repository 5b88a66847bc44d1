"""Replay DiT forwards as CUDA graphs: per request and branch (`GraphedForward`, the reference path), or kept
across requests and keyed by shape (`GraphCache`, the fast path: a second request of a shape captures nothing).

A 1024x1024 Qwen-Image forward launches ~4,000 kernels; in eager mode the CPU needs longer to launch them
than the H100 needs to run them, so the GPU idles (and more so when sequence parallelism halves the GPU work).
Shapes are fixed for the whole denoise loop of a request, so the forward of each CFG branch is captured once,
after one warm-up call, and replayed every step with the new latents and timestep copied into its static
inputs. Collectives inside (Ulysses all-to-alls on NCCL) are captured too. Captures use `thread_local` error
mode, so other threads' CUDA work (the encoder and VAE stages of `serve all`) cannot invalidate them. On the
CPU, or with graphs off (`StageSettings.cuda_graphs`, the `--cuda-graphs` flag), the forward simply runs eagerly.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def graphs_enabled(device: torch.device, enabled: bool = True) -> bool:
    return enabled and device.type == "cuda"


class GraphedForward:
    """`forward(latents, timestep)` captured on first use; later calls replay it.

    The returned tensor is the graph's static output: it is overwritten by the next call, so callers consume
    it (CFG, the Euler step, a clone) before calling again.
    """

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._capture(latents, timestep)
        self.inputs[0].copy_(latents)
        self.inputs[1].copy_(timestep)
        self.graph.replay()
        return self.output

    def _capture(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.inputs = (latents.clone(), timestep.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture requires
            warm = self.forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = self.forward(*self.inputs)
        return warm


def maybe_graphed(forward: Forward, device: torch.device, enabled: bool = True) -> Forward:
    return GraphedForward(forward) if graphs_enabled(device, enabled) else forward


class GraphCache:
    """Forwards captured as CUDA graphs and kept across requests, keyed by a caller's key plus the shapes and
    dtypes of the tensor arguments: a second request of the same shape replays, with no warm-up or capture.

    Every call copies its tensors into the entry's static inputs, replays, and returns a clone of the static
    output, so no caller ever holds memory that a later replay overwrites; that is also what makes it safe for
    all entries to share one memory pool (only one replays at a time, under the lock). Captures use
    `thread_local` error mode so the other stages' CUDA work on other threads (`serve all`) cannot invalidate
    them, and run on a side stream as capture requires. Least recently used entries beyond `capacity` go.
    """

    def __init__(self, capacity: int = 32, enabled: bool = True) -> None:
        self.capacity = capacity
        self.enabled = enabled  # False: every call runs eagerly (the `--cuda-graphs` flag)
        self._entries: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self._uncapturable: set[tuple] = set()
        self.captures = 0

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        if not tensors[0].is_cuda or not graphs_enabled(tensors[0].device, self.enabled):
            return fn(*tensors)
        full_key = (key, tuple((tuple(t.shape), t.dtype) for t in tensors))
        with self._lock:
            if full_key in self._uncapturable:
                return fn(*tensors)
            entry = self._entries.get(full_key)
            if entry is None:
                return self._capture(full_key, fn, tensors)
            self._entries.move_to_end(full_key)
            for static, value in zip(entry.inputs, tensors, strict=True):
                static.copy_(value)
            entry.graph.replay()
            return entry.output.clone()

    def _capture(self, key: tuple, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs = tuple(t.clone() for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, autotunes, picks kernels) off the capture stream
            warm = fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = fn(*inputs)
        except RuntimeError as exc:  # something in `fn` cannot be captured (a host sync): run it eagerly
            log.warning("CUDA graph capture failed, running this shape eagerly: %s", exc)
            self._uncapturable.add(key)
            torch.cuda.synchronize()
            return warm
        self._entries[key] = _Captured(graph, inputs, output)
        self.captures += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return warm


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
