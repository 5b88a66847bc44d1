"""Start a denoiser group on this machine: this process becomes rank 0, the others are worker processes.

Used by `imagegen generate/edit --sp P [--cfg-parallel]`, the denoiser service and tests. Under torchrun
(WORLD_SIZE set by the launcher) nothing is spawned: every process joins as the rank torchrun gave it. Every
entry takes one `GroupSpec` (`imagegen.common.parallel.spec`), so all ranks build the same group.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import torch

from imagegen.common.checkpoint import open_model_folder, parse_device, parse_dtype
from imagegen.common.families import get_family
from imagegen.common.parallel.group import GroupError, ParallelGroup
from imagegen.common.parallel.runner import GroupDenoiser, follow_leader
from imagegen.common.parallel.spec import GroupSpec

log = logging.getLogger(__name__)
_RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_torchrun_follower() -> bool:
    """A torchrun rank other than 0: it serves nothing and runs the jobs rank 0 broadcasts."""
    return launched_by_torchrun() and int(os.environ["RANK"]) != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Workers:
    """The spawned ranks 1..N-1, watched so that a failure is reported with its exit status."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes
        self.failure: str | None = None
        self._watch = threading.Thread(target=self._watch_loop, daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        while self.processes and self.failure is None:
            for rank, proc in enumerate(self.processes, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    self.failure = f"rank {rank} exited with status {code}"
                    return
            if all(p.poll() is not None for p in self.processes):
                return
            threading.Event().wait(0.2)

    def stop(self, graceful: bool, timeout: float = 30.0) -> None:
        for proc in self.processes:
            if not graceful:
                proc.kill()
        for proc in self.processes:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def local_group(spec: GroupSpec):
    """Yield rank 0's `GroupDenoiser` of the group `spec` describes, on this machine; stop every rank on exit.
    The P ranks split into Ulysses x ring as `spec.layout()` says.

    A rank that dies or hangs makes the next collective on rank 0 fail (a closed connection, or the collective
    timeout); `GroupDenoiser.run` raises that as `GroupError`, naming the failed rank where known, and the
    workers of a broken group are killed on exit instead of being asked to stop.
    """
    spec = spec.resolved()  # a bad --ulysses fails here, before anything is spawned
    parse_dtype(spec.dtype)
    device = parse_device(spec.device)
    world = spec.world
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise GroupError(f"a group of {world} processes needs {world} GPUs; {torch.cuda.device_count()} visible")
    saved = {name: os.environ.get(name) for name in _RENDEZVOUS_VARS}
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    command = [sys.executable, "-m", "imagegen.common.parallel.worker", "--spec", spec.to_json()]
    processes = [
        subprocess.Popen(command, env={**os.environ, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(1, world)
    ]
    workers = _Workers(processes)
    os.environ.update({**rendezvous, "RANK": "0", "LOCAL_RANK": "0"})
    group = None
    runner = None
    try:
        try:
            group, denoiser = join_group(spec)
            runner = GroupDenoiser(group, denoiser, lambda: workers.failure)
            yield runner
        except RuntimeError as exc:  # torch.distributed errors while forming the group
            raise GroupError(f"denoiser group failed: {workers.failure or exc}") from exc
    finally:
        if runner is not None:
            _release(runner)
        healthy = runner is not None and runner.closed and not runner.broken
        workers.stop(graceful=healthy)
        if group is not None:
            # Rank 0 lives in the caller's process, which may start more groups: never leave it a stale one.
            group.close(peers_gone=not healthy)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _release(runner: GroupDenoiser) -> None:
    """Send the other ranks their stop, also when the caller's code raised: a group that is still in step must
    not leave them waiting for a job until the collective timeout. A group that breaks doing so stays broken."""
    try:
        runner.close()
    except GroupError:
        pass


def join_group(spec: GroupSpec) -> tuple[ParallelGroup, object]:
    """Join the group the rendezvous variables describe (every rank calls this, whoever started it) and load
    this rank's denoise stage, both as `spec` says."""
    layout = spec.layout()
    device = parse_device(spec.device)
    group = ParallelGroup.from_environment(spec.sp, spec.cfg_parallel, device, spec.timeout_s, layout, spec.ring_merge)
    fields = {"rank": group.rank, "world_size": group.world_size, "layout": str(layout)}
    log.info("joined the denoiser group", extra={**fields, "cfg_parallel": spec.cfg_parallel})
    folder = open_model_folder(spec.model)
    stage = get_family(folder.family).denoiser(folder, parse_dtype(spec.dtype), group.device, spec.stage)
    return group, stage


def follow_as_rank(spec: GroupSpec) -> None:
    """A rank other than 0: join the group and run every job rank 0 broadcasts until it says stop."""
    group, denoiser = join_group(spec)
    try:
        follow_leader(group, denoiser)
    finally:
        group.close()


@contextmanager
def group_denoiser(spec: GroupSpec):
    """Rank 0's `GroupDenoiser`: the group torchrun started, or one spawned on this machine."""
    if not launched_by_torchrun():
        with local_group(spec) as runner:
            yield runner
        return
    group, denoiser = join_group(spec)
    runner = GroupDenoiser(group, denoiser)
    try:
        yield runner
    finally:
        _release(runner)
        if runner.closed and not runner.broken:
            group.close()  # the other ranks are torchrun's to stop: a broken group is left to the exit
