"""An adapter set merged into a transformer's weights for a run, and restored exactly afterwards.

Merging (`W += sum_i scale_i * scaling_i * B_i @ A_i`, in float32, rounded once to the weight's dtype) leaves
every forward as fast as the base model's: the fast path's fused QKV / W13 buffers are written through the
linears' views, compiled graphs and captured CUDA graphs read the new values in place, nothing is re-traced.
Unmerging copies back the weights saved before the merge, so the base model comes back bit for bit (a
subtraction would not: `(W + d) - d != W` in floating point). The cost is a copy of the touched weights while
a set is merged (`saved_bytes`); a slot keeps a set merged across requests that use the same one.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import torch

from imagegen.common.lora.files import Adapter


class AdapterSlot:
    """The adapter set merged into one transformer now (`key`), and the original weights it replaced."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.key: Hashable = ()
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    @property
    def saved_bytes(self) -> int:
        return sum(w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
                   for w, b in self._saved.values())  # fmt: skip

    def use(self, key: Hashable, adapters: Sequence[tuple[Adapter, float]]) -> None:
        """Make `adapters` (each with its request scale) the merged set; nothing to do when `key` already is."""
        with self._lock:
            if key == self.key:
                return
            self._restore()
            try:
                self._merge(adapters)
            except BaseException:
                self._restore()  # a half-merged model must never serve a request
                raise
            self.key = key

    @torch.no_grad()
    def _restore(self) -> None:
        for module, (weight, bias) in self._saved.items():
            linear = self.transformer.get_submodule(module)
            linear.weight.data.copy_(weight)
            if bias is not None:
                linear.bias.data.copy_(bias)
        self._saved.clear()
        self.key = ()

    @torch.no_grad()
    def _merge(self, adapters: Sequence[tuple[Adapter, float]]) -> None:
        modules = sorted({m for adapter, _ in adapters for m in adapter.layers})
        for module in modules:  # one module at a time: the float32 work never holds more than one weight
            linear = self.transformer.get_submodule(module)
            weight, bias = linear.weight, linear.bias
            # W in float32 (a copy, also of a float32 W), each adapter added by one addmm, rounded once.
            merged = weight.detach().to(torch.float32, copy=True)
            merged_bias = None
            for adapter, scale in adapters:
                layer = adapter.layers.get(module)
                if layer is None:
                    continue
                factor = scale * layer.scaling
                up, down = layer.up.to(weight.device, torch.float32), layer.down.to(weight.device, torch.float32)
                merged.addmm_(up, down, alpha=factor)
                if layer.up_bias is not None:
                    if bias is None:
                        raise ValueError(f"{module} has no bias for the adapter's lora_B bias")
                    if merged_bias is None:
                        merged_bias = bias.detach().to(torch.float32, copy=True)
                    merged_bias.add_(layer.up_bias.to(weight.device, torch.float32), alpha=factor)
            saved_bias = bias.detach().clone() if merged_bias is not None else None
            self._saved[module] = (weight.detach().clone(), saved_bias)
            # `.data.copy_` writes through views: the fused QKV/W13 buffers of the fast path change too.
            weight.data.copy_(merged)
            if merged_bias is not None:
                bias.data.copy_(merged_bias)
