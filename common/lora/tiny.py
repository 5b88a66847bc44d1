"""Random LoRA files for a checkpoint (`imagegen make-tiny-lora`): tests, the demo and the GPU benchmark.

Every linear of the transformer's blocks is adapted, with the delta about `strength` times the weight's own
spread, so a wrong scale, a missed layer or a leftover merge changes the image visibly. Two layouts:
`peft` (diffusers keys, alpha in `lora_adapter_metadata`: scaling alpha / r != 1) and `kohya`
(`diffusion_model.*.lora_down/lora_up` with `.alpha` tensors: the community layout diffusers converts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagegen.common.lora.files import METADATA_KEY, PREFIX

BLOCK_LISTS = ("transformer_blocks", "layers", "noise_refiner", "context_refiner")
FORMATS = ("peft", "kohya")


def adapted_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linears inside the transformer's block lists, by module path."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] in BLOCK_LISTS
    }


def random_lora(
    transformer: torch.nn.Module,
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.3,
    fmt: str = "peft",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of a random adapter for `transformer` (CPU tensors of `dtype`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    generator = torch.Generator().manual_seed(seed)
    alpha = rank / 2  # scaling 0.5: a loader that ignores alpha is off by 2x
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in adapted_linears(transformer).items():
        out_features, in_features = linear.weight.shape
        spread = float(linear.weight.detach().float().std()) or 1.0  # on the weight's device: no host copy
        down = torch.randn(rank, in_features, generator=generator) / rank**0.5
        up = torch.randn(out_features, rank, generator=generator) * (strength * spread / 0.5)
        if fmt == "peft":
            tensors[f"{PREFIX}{name}.lora_A.weight"] = down.to(dtype).contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = up.to(dtype).contiguous()
        else:
            tensors[f"diffusion_model.{name}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"diffusion_model.{name}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    header = {"format": "pt"}
    if fmt == "peft":
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(adapted_linears(transformer))}
        header[METADATA_KEY] = json.dumps({f"{PREFIX}{k}": v for k, v in config.items()}, sort_keys=True)
    return tensors, header


def make_tiny_lora(model: str | Path, out: str | Path, rank: int = 4, seed: int = 0, fmt: str = "peft") -> Path:
    """Write a random adapter for the checkpoint at `model` to `out` (a .safetensors file)."""
    from imagegen.common.checkpoint import open_model_folder

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the adapter file must end in .safetensors")
    transformer = open_model_folder(model).load("transformer", torch.float32, "cpu")
    tensors, header = random_lora(transformer, rank, seed, fmt=fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata=header)
    return out
