"""Warm-up before a denoiser reports SERVING: compile, autotune and capture the fast path for the configured
sizes. The compiled blocks' image and text dims are dynamic, so the first size compiles them for every size; each
further size (warmed up here or first met in a request) costs its CUDA graph captures (about one extra forward per
shape, as a new prompt length does) and the attention kernel measurement of its new shapes (a few ms).

Each family supplies its warm-up jobs (`Family.warmup_jobs`): a short CFG job whose two prompts have different
lengths (the text-length dimension compiles dynamic, and both attention layouts are traced) and one without
CFG. Inductor's caches live under the `--cache-dir` (`imagegen.common.kernels.configure_compiler`), so a restart
on the same machine mostly loads.
"""

from __future__ import annotations

import logging
import time

from imagegen.common.denoise import StepHooks
from imagegen.common.errors import InvalidArgument
from imagegen.common.families import Family
from imagegen.common.options import ADVERTISED_SIZES, ResolvedOptions

log = logging.getLogger(__name__)


def warmup_options(
    family: str, width: int, height: int, negative: str | None, guidance_scale: float, num_input_images: int = 0
) -> ResolvedOptions:
    """The options of a family's warm-up job: two steps at `width` x `height` (`negative` None: no CFG)."""
    return ResolvedOptions(
        family=family,
        prompt="warm-up",
        negative_prompt=negative,
        width=width,
        height=height,
        steps=2,
        guidance_scale=guidance_scale,
        cfg_normalization=0.0,
        cfg_truncation=1.0,
        max_sequence_length=512,
        seed=0,
        num_images=1,
        num_input_images=num_input_images,
    )


def parse_sizes(text: str | None, family: Family) -> list[tuple[int, int]]:
    """`"1024x1024,768x1344"` -> [(width, height), ...]; `"default"` is the family's default size and the sizes
    the HTTP API advertises (`ADVERTISED_SIZES`), `"none"` or empty nothing."""
    text = (text or "").strip().lower()
    if text in ("", "none", "off"):
        return []
    if text == "default":
        side = family.defaults.size or 1024
        return list(dict.fromkeys([(side, side), *ADVERTISED_SIZES]))
    sizes = []
    for part in text.split(","):
        width, sep, height = part.strip().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or int(width) % 16 or int(height) % 16:
            raise InvalidArgument("warmup_sizes", f"expected WIDTHxHEIGHT (multiples of 16), got {part!r}")
        sizes.append((int(width), int(height)))
    return sizes


def warm_up(
    engine, family: Family, transformer_config: dict, sizes: list[tuple[int, int]], max_batch: int = 1
) -> float:
    """Run the family's warm-up jobs of every size through `engine` (`run(job, hooks)`), and with batching
    (`max_batch` > 1) each as a batch of two too (`run_batch`: the compiled stages' dynamic batch dim, the
    per-row attention of several requests); seconds taken."""
    start = time.perf_counter()
    for width, height in sizes:
        for job in family.warmup_jobs(width, height, transformer_config):
            engine.run(job, StepHooks())
            if max_batch > 1:
                engine.run_batch([job, job], [StepHooks(), StepHooks()])
    seconds = time.perf_counter() - start
    if sizes:
        log.info("warm-up of %s done in %.1f s", ", ".join(f"{w}x{h}" for w, h in sizes), seconds)
    return seconds
