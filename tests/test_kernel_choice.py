"""Kernel choice without process-global state: the fast path's attention names its kernel on every call (the
backend's own ATen op) and its per-shape measurement times those ops, so no thread ever changes SDPA's
process-wide backend switches (`at::globalContext()`). Under `serve all` the encoder's masked grouped-query
attention and the VAE's attention run on other threads while the denoiser's thread measures and uses its kernels.

The CPU has one candidate in production (the kernel SDPA itself picks, so the fast path stays equal to the
reference); these tests give it two, so the CPU measures and chooses as CUDA does among cuDNN, flash and
memory-efficient attention. The CUDA kernels are checked bit for bit against SDPA in bench/load_gpu.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from imagegen.common import kernels

SWITCHES = (
    torch.backends.cuda.flash_sdp_enabled,
    torch.backends.cuda.mem_efficient_sdp_enabled,
    torch.backends.cuda.math_sdp_enabled,
    torch.backends.cuda.cudnn_sdp_enabled,
)
# The denoiser thread's attention shapes `[B, S, H, D]`, each new (a measurement) and large enough to take a few
# ms, so the two threads overlap.
DIT_SHAPES = [(1, 384 + 32 * i, 4, 32) for i in range(8)]


def switches() -> tuple[bool, ...]:
    return tuple(read() for read in SWITCHES)


@pytest.fixture
def measured_cpu(monkeypatch):
    """Two CPU candidates (so the measurement really chooses) and no earlier choices. The guard lets the thread
    test run unchanged on the code before this design (no candidate table: its measurement flipped SDPA's
    switches), where it fails."""
    if hasattr(kernels, "CANDIDATES"):
        monkeypatch.setitem(kernels.CANDIDATES, "cpu", (kernels.CPU_FLASH, kernels.MATH))
    monkeypatch.setattr(kernels, "_choices", {})


def encoder_attention() -> tuple[torch.Tensor, torch.Tensor]:
    """What the text encoders run on their thread: transformers' SDPA attention with grouped-query heads (32
    query, 8 key/value heads, as Qwen3-4B) and a padding mask, and SDPA's own grouped-query form with a mask."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 40, 16, generator=generator)
    k, v = (torch.randn(2, 8, 40, 16, generator=generator) for _ in range(2))
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[1, ..., 29:] = False  # the second prompt is shorter
    module = SimpleNamespace(num_key_value_groups=4, is_causal=False, training=False)
    hf, _ = sdpa_attention_forward(module, q, k, v, attention_mask=mask, dropout=0.0, scaling=None, is_causal=False)
    gqa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return hf, gqa


def test_other_threads_attention_unaffected_while_the_fast_path_chooses(measured_cpu) -> None:
    expected, initial = encoder_attention(), switches()
    running, done = threading.Event(), threading.Event()
    seen: set[tuple[bool, ...]] = set()
    errors: list[BaseException] = []
    overlapping = 0

    def encoder_thread() -> None:
        nonlocal overlapping
        running.wait(30)
        while not done.is_set():
            seen.add(switches())
            try:
                for got, want in zip(encoder_attention(), expected, strict=True):
                    assert torch.equal(got, want), "another thread's attention changed kernel"
            except (RuntimeError, AssertionError) as exc:  # "No available kernel", or different bits
                errors.append(exc)
            seen.add(switches())
            overlapping += 1

    other = threading.Thread(target=encoder_thread)
    other.start()
    outputs = []
    try:
        running.set()
        for i, shape in enumerate(DIT_SHAPES):
            q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(10 * i + j)) for j in range(3))
            kernels._fastest(q, k)  # the measurement (warm-up and every new shape)
            outputs.append((q, k, v, kernels.sdpa(q, k, v)))  # measured once more, cached, then used
    finally:
        done.set()
        other.join(60)
    assert not errors, f"{len(errors)} encoder attentions failed or changed while the fast path chose: {errors[0]}"
    assert seen == {initial}, f"SDPA's process-wide switches changed: {seen - {initial}}"
    assert overlapping >= 3, "the threads did not overlap"
    choices = kernels.attention_choices()
    by_name = {c.name: c for c in (kernels.CPU_FLASH, kernels.MATH)}
    for q, k, v, out in outputs:  # each call ran the kernel measured for its shape
        kernel = by_name[choices[f"q{list(q.shape)} k{list(k.shape)}"]]
        heads_first = [t.transpose(1, 2) for t in (q, k, v)]
        assert torch.equal(out.transpose(1, 2), kernel.run(*heads_first))
        assert (out.transpose(1, 2) - F.scaled_dot_product_attention(*heads_first)).abs().max() < 1e-5


@pytest.mark.parametrize(("kernel", "backend"), [("CPU_FLASH", SDPBackend.FLASH_ATTENTION), ("MATH", SDPBackend.MATH)])
def test_each_kernel_is_sdpa_with_that_backend_bit_for_bit(kernel: str, backend: SDPBackend) -> None:
    """The ops are called as SDPA calls them when that backend is selected (checked here single-threaded, the
    one place a test may flip the switches): the same bits, on the fast path's `[B, H, S, D]` views."""
    q, k, v = (torch.randn(2, 70, 3, 24).transpose(1, 2) for _ in range(3))
    with sdpa_kernel([backend]):
        want = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(getattr(kernels, kernel).run(q, k, v), want)


def test_production_cpu_choice_is_sdpa_default(monkeypatch) -> None:
    """On the CPU in production the fast path's attention is what SDPA chooses by itself."""
    monkeypatch.setattr(kernels, "_choices", {})
    q, k, v = (torch.randn(1, 50, 2, 16) for _ in range(3))
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.equal(kernels.sdpa(q, k, v), want)
    assert set(kernels.attention_choices().values()) == {"FLASH_ATTENTION_CPU"}


def test_a_shape_first_seen_in_a_capture_is_measured_later(measured_cpu, monkeypatch) -> None:
    """Nothing can be timed while a CUDA graph is captured: that call gets the first usable candidate and the
    choice is not kept, so the shape is measured on its next call instead of keeping a default forever."""
    q = torch.randn(1, 64, 2, 16)
    monkeypatch.setattr(kernels, "_capturing", lambda tensor: True)
    measured = []
    real = kernels._fastest
    monkeypatch.setattr(kernels, "_fastest", lambda q, k: measured.append(q.shape) or real(q, k))
    assert kernels.attention_kernel(q, q) is kernels.CPU_FLASH
    assert not kernels.attention_choices() and not measured
    monkeypatch.setattr(kernels, "_capturing", lambda tensor: False)
    chosen = kernels.attention_kernel(q, q)
    assert measured == [q.shape] and kernels.attention_choices() == {"q[1, 64, 2, 16] k[1, 64, 2, 16]": chosen.name}
    start = time.perf_counter()
    assert kernels.attention_kernel(q, q) is chosen and measured == [q.shape]  # cached: no second measurement
    assert time.perf_counter() - start < 0.01
