"""The family packages: their facts (what the gateway and the client read) import neither torch nor diffusers,
and the facts written without diffusers equal diffusers' own constants."""

from __future__ import annotations

import subprocess
import sys

from diffusers.models.transformers import transformer_z_image

from imagegen.common.families import FAMILIES, z_image

FACTS = ("imagegen.common.families", "imagegen.common.families.qwen_image", "imagegen.common.families.z_image")


def heavy_modules_after(imports: tuple[str, ...]) -> list[str]:
    """Which of torch / diffusers a fresh interpreter holds after importing `imports` (and reading the table)."""
    probe = (
        "import importlib, sys\n"
        f"for name in {imports!r}:\n"
        "    importlib.import_module(name)\n"
        "from imagegen.common.families import FAMILIES\n"
        "[(f.defaults, f.default_size([(640, 480)]), f.text_components) for f in FAMILIES.values()]\n"
        "print(' '.join(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_facts_import_neither_torch_nor_diffusers() -> None:
    assert heavy_modules_after(FACTS) == []


def test_the_check_sees_torch_where_a_stage_module_is_imported() -> None:
    """Trap: the probe does notice torch (the stages import it)."""
    assert "torch" in heavy_modules_after(("imagegen.common.families.z_image.pipeline",))


def test_facts_equal_diffusers_constants() -> None:
    assert z_image.SEQ_MULTI_OF == transformer_z_image.SEQ_MULTI_OF
    for family in FAMILIES.values():
        assert family.denoiser.__module__ == f"imagegen.common.families.{family.package}.pipeline"
        assert family.vae.__module__ == f"imagegen.common.families.{family.package}.vae"
