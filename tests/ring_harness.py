"""Denoiser groups for the Ulysses x ring tests, started in well under a second each.

`local_group` starts every rank as a fresh interpreter, which pays ~10 s of imports per rank: with groups of up
to 16 ranks on a 2-core CI machine that is minutes per group. Here the non-leader ranks are forked from a
forkserver that imported the runtime once (before any thread pool existed, so forking it is safe); each rank
then runs exactly what a launched rank runs (`follow_as_rank`), and this process is rank 0 (`join_group` +
`GroupDenoiser`), as under `local_group`.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from imagegen.common.attention import sdpa
from imagegen.common.parallel.launch import follow_as_rank, free_port, join_group
from imagegen.common.parallel.runner import GroupDenoiser
from imagegen.common.parallel.spec import GroupSpec
from imagegen.common.parallel.usp import UlyssesRingAttention

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
_context = None


def forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.ring_harness"])
    return _context


def _follower(rank: int, env: dict[str, str], spec: GroupSpec, threads: int, patch: str | None) -> None:
    os.environ.update({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    with patched(patch):
        follow_as_rank(spec)


@contextmanager
def forked_group(
    model: str | Path,
    sp: int,
    cfg_parallel: bool,
    ulysses: int | None,
    threads: int,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    patch: str | None = None,
    ring_merge: str = "ordered",
):
    """Rank 0's `GroupDenoiser` of a P x C group whose other ranks are forked; `env` is set on every rank and
    `patch` (a name in `PATCHES`) applied on every rank; `ring_merge` is the spec's (every rank's)."""
    world = sp * (2 if cfg_parallel else 1)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    shared = {**rendezvous, **(env or {})}
    spec = GroupSpec(model, sp, cfg_parallel, ulysses, timeout_s=timeout_s, ring_merge=ring_merge)
    ctx = forkserver()
    ranks = [
        ctx.Process(target=_follower, args=(r, shared, spec, threads, patch), daemon=True) for r in range(1, world)
    ]
    saved = {name: os.environ.get(name) for name in (*_RENDEZVOUS, *shared)}
    stack = ExitStack()
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})
    for process in ranks:
        process.start()
    group = runner = None
    try:
        stack.enter_context(patched(patch))
        group, denoiser = join_group(spec)
        runner = GroupDenoiser(group, denoiser)
        yield runner
        runner.close()
        for process in ranks:
            process.join(timeout=60)
        assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
    finally:
        stack.close()
        for process in ranks:
            if process.is_alive():
                process.kill()
        if group is not None:
            group.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the trap: replicated text sent through the ring (the bug peers shipped) ---------------------------------------
def text_through_ring(self, q, keys_values, mine, replicated_first):
    """`UlyssesRingAttention._ordered` with the replicated text stacked onto every key/value block, so it
    travels the ring and every rank's copy is attended: R copies of each text key instead of one."""
    if mine is None:
        return _ordered(self, q, keys_values, mine, replicated_first)
    text = torch.stack([mine.k, mine.v])
    blocks = self.gather_blocks(torch.cat([text, keys_values], dim=2))
    rows = len(mine)
    keep = [torch.cat([torch.arange(rows), rows + self.real_rows[j].cpu()]) for j in range(len(blocks))]
    k, v = (torch.cat([b[i].index_select(1, idx) for b, idx in zip(blocks, keep, strict=True)], 1) for i in (0, 1))
    out = sdpa(torch.cat([mine.q, q], 1), k, v) if replicated_first else sdpa(torch.cat([q, mine.q], 1), k, v)
    if replicated_first:
        return out[:, rows:], out[:, :rows]
    return out[:, : q.shape[1]], out[:, q.shape[1] :]


_ordered = UlyssesRingAttention._ordered
PATCHES = {"text-through-ring": (UlyssesRingAttention, "_ordered", text_through_ring)}


@contextmanager
def patched(name: str | None):
    if name is None:
        yield
        return
    owner, attribute, replacement = PATCHES[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)
