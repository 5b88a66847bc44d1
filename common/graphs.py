"""Replay a DiT forward as one CUDA graph per request and branch.

A 1024x1024 Qwen-Image forward launches ~4,000 kernels; in eager mode the CPU needs longer to launch them
than the H100 needs to run them, so the GPU idles (and more so when sequence parallelism halves the GPU work).
Shapes are fixed for the whole denoise loop of a request, so the forward of each CFG branch is captured once,
after one warm-up call, and replayed every step with the new latents and timestep copied into its static
inputs. Collectives inside (Ulysses all-to-alls on NCCL) are captured too. On the CPU, or with
`IMAGEGEN_CUDA_GRAPHS=0`, the forward simply runs eagerly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("IMAGEGEN_CUDA_GRAPHS", "1") != "0"


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
        with torch.cuda.graph(self.graph):
            self.output = self.forward(*self.inputs)
        return warm


def maybe_graphed(forward: Forward, device: torch.device) -> Forward:
    return GraphedForward(forward) if graphs_enabled(device) else forward
