"""Helpers shared by the text encoders of both families."""

from __future__ import annotations

import torch


def encoder_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer trunk of a `*ForConditionalGeneration`/`*ForCausalLM` (its hidden states are all we use),
    so the vocabulary projection is never computed; a bare model is returned as is."""
    return getattr(model, "model", model)


def take_masked(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of `[S, D]` hidden states where `mask` is set (the pipelines' masked extraction)."""
    return hidden[mask.bool()]


def ensure_fp32_rotary(model: torch.nn.Module) -> None:
    """Keep every rotary `inv_freq` buffer in float32, whatever dtype the model was loaded in.

    A model cast to bf16 as a whole quantises these frequencies and the vision tokens drift (sglang PR #20679
    item 3). The buffers are recomputed from the module's own config rather than upcast, because an upcast
    bf16 value is still the rounded one.
    """
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype == torch.float32:
            continue
        fresh = _recompute_inv_freq(module)
        module.inv_freq = fresh.to(inv_freq.device)
        if hasattr(module, "original_inv_freq"):
            module.original_inv_freq = fresh.clone().to(inv_freq.device)


def _recompute_inv_freq(module: torch.nn.Module) -> torch.Tensor:
    if hasattr(module, "compute_axial_rope_parameters"):
        inv_freq, _ = module.compute_axial_rope_parameters(module.config)
    elif hasattr(module, "rope_init_fn"):
        inv_freq, _ = module.rope_init_fn(module.config, "cpu")
    elif hasattr(module, "compute_default_rope_parameters"):
        inv_freq, _ = module.compute_default_rope_parameters(module.config, "cpu")
    else:
        raise TypeError(f"cannot recompute rotary frequencies of {type(module).__name__}")
    return inv_freq.float()
