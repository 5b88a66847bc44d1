"""Tiny random-weight ControlNets of the real diffusers classes, matching the tiny base checkpoints of `tiny.py`.

`QwenImageControlNetModel` (InstantX layout: "union", and the inpainting variant with 4 extra input features for
the mask) and `ZImageControlNetModel` (alibaba-pai Fun-Controlnet-Union 1.0, 2.0 and 2.1 layouts) are built with
the base model's widths, drawn like the base components (`tiny_parts.randomise_weights_`: N(0, 1/fan_in) weights,
re-randomised norms and biases) and saved with `save_pretrained`, so `from_pretrained` loads them offline.

diffusers zero-initialises every ControlNet output projection (`controlnet_blocks`, `controlnet_x_embedder`,
`before_proj`, `after_proj`), which makes an untrained ControlNet add exactly nothing; here they are random like
every other weight, so a residual that is skipped, misplaced or mis-scaled changes the image visibly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

from diffusers import QwenImageControlNetModel, ZImageControlNetModel
from torch import nn

from imagegen.common import tiny

# Bump whenever the bytes written change: it is part of the cache folder name.
CONTROLNET_BUILDER_VERSION = 1
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _qwen(layers: int, extra_channels: int) -> Callable[[int], nn.Module]:
    def build(heads: int) -> nn.Module:
        return QwenImageControlNetModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=layers,
            attention_head_dim=tiny.DIT_HEAD_DIM,
            num_attention_heads=heads,
            joint_attention_dim=tiny.QWEN_TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),  # as the tiny transformer: the ControlNet computes its own RoPE tables
            extra_condition_channels=extra_channels,
        )

    return build


def _z(places: list[int], in_dim: int, mode: str | None) -> Callable[[int], nn.Module]:
    def build(heads: int) -> nn.Module:
        return ZImageControlNetModel(
            control_layers_places=places,
            control_refiner_layers_places=[0, 1] if mode is not None else None,
            control_in_dim=in_dim,
            add_control_noise_refiner=mode,
            dim=tiny.Z_DIT_HEADS * tiny.Z_DIT_HEAD_DIM,  # the tiny Z-Image DiT keeps dim 96 whatever its heads
            n_refiner_layers=2,
            n_heads=heads,
            n_kv_heads=heads,
        )

    return build


# (family, variant) -> (builder over the head count, default heads). The published shapes these mirror
# (/work/notes/conditioning-modes.md): InstantX union 5 layers / inpainting 6 layers (extra 4 channels) for 60
# DiT blocks; Fun-Controlnet-Union 1.0 on 6 of 30 layers with 16 input channels, 2.0 / 2.1 on 15 layers with 33
# (control, mask, masked image) and hints into the noise refiner. The tiny base DiTs have 2 blocks: one variant
# per family covers a residual shared by two blocks (interval 2) and one a residual per block.
_BUILDERS: dict[tuple[str, str], tuple[Callable[[int], nn.Module], int]] = {
    ("qwen-image", "union"): (_qwen(layers=2, extra_channels=0), tiny.DIT_HEADS),
    ("qwen-image", "inpaint"): (_qwen(layers=1, extra_channels=4), tiny.DIT_HEADS),
    ("z-image", "union"): (_z([0], 16, None), tiny.Z_DIT_HEADS),
    ("z-image", "union-2.0"): (_z([0, 1], 33, "control_layers"), tiny.Z_DIT_HEADS),
    ("z-image", "union-2.1"): (_z([0, 1], 33, "control_noise_refiner"), tiny.Z_DIT_HEADS),
}
VARIANTS: dict[str, tuple[str, ...]] = {}
for _family, _variant in _BUILDERS:
    VARIANTS.setdefault(_family, ())
    VARIANTS[_family] += (_variant,)
# Per-component seed offsets, apart from the base components' (1-3, 11-13).
_OFFSETS = {key: 21 + index for index, key in enumerate(_BUILDERS)}


def _validate(family: str, variant: str) -> None:
    if (family, variant) not in _BUILDERS:
        raise ValueError(f"no tiny ControlNet {family!r}/{variant!r}; known: {sorted(_BUILDERS)}")


def build_tiny_controlnet_model(
    family: str, variant: str = "union", seed: int = 0, *, heads: int | None = None
) -> nn.Module:
    """The in-memory ControlNet (float32, eval mode) that `build_tiny_controlnet` saves. `heads` must equal the
    base tiny DiT's (`tiny.build_tiny_pipeline(..., heads=)`): the residuals add to its hidden states."""
    _validate(family, variant)
    build, default_heads = _BUILDERS[(family, variant)]
    return tiny._seeded(seed, _OFFSETS[(family, variant)], lambda: build(heads or default_heads))


def build_tiny_controlnet(
    family: str, out_dir: str | os.PathLike, variant: str = "union", seed: int = 0, *, heads: int | None = None
) -> pathlib.Path:
    """Write the ControlNet as a diffusers model folder (`config.json` + safetensors) and return its path."""
    model = build_tiny_controlnet_model(family, variant, seed, heads=heads)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_controlnet_cached(
    family: str, variant: str = "union", seed: int = 0, cache_dir: str | None = None, heads: int | None = None
) -> pathlib.Path:
    """Build once into the tiny-checkpoint cache (`tiny.tiny_checkpoint_cached`'s root) as
    `controlnet-<family>-<variant>[-h<heads>]-s<seed>-v<CONTROLNET_BUILDER_VERSION>`; concurrent builders each
    write a private folder and rename it into place, the first rename wins."""
    _validate(family, variant)
    root = tiny._cache_root(cache_dir)
    name = f"controlnet-{family}-{variant}{f'-h{heads}' if heads else ''}-s{seed}-v{CONTROLNET_BUILDER_VERSION}"
    final = root / name
    if (final / WEIGHTS_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    os.chmod(tmp, 0o755)
    try:
        build_tiny_controlnet(family, tmp, variant, seed, heads=heads)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
