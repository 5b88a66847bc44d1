"""Starting and stopping real service processes (and a private redis-server) for the service tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = 1  # services and the in-test diffusers reference must agree for bit-exact float32 results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env["IMAGEGEN_TORCH_THREADS"] = str(TORCH_THREADS)
    env.update(extra)
    return env


class Process:
    """A child process with its output in a log file; stopped with SIGTERM (then SIGKILL) by `stop`."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._env = env or service_env()
        self._launch(argv)

    def _launch(self, argv: list[str]) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def stop_all(processes: list[Process]) -> None:
    """SIGTERM everything first, then wait: the processes drain and exit in parallel."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


class Service(Process):
    """`python -m imagegen.cli serve KIND ...` on free gRPC and metrics ports."""

    def __init__(self, name: str, kind: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.kind, self.args = kind, args
        self._restarted = False
        super().__init__(name, self._argv(), log_dir, env)

    def _argv(self, new_ports: bool = True) -> list[str]:
        if new_ports:
            self.port = free_port()
            self.metrics_port = free_port()
            self.address = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "imagegen.cli", "serve", self.kind, "--host", "127.0.0.1"]
        # The default drain (--drain-timeout): a SIGTERMed service lets what it holds finish, as in production.
        argv += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        if self.kind == "all":
            if new_ports:
                self.http_port = free_port()
            # `serve all` has HTTP on (8000) by default: a free port keeps parallel servers apart; a test that
            # wants HTTP off passes --http-port=0.
            argv += ["--http-port", str(self.http_port)]
        return argv + self.args

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Start it again on the same ports (its clients keep their address), once the old process has exited;
        `env` replaces its environment."""
        if self.alive():
            raise RuntimeError(f"{self.name} is still running")
        self._log.close()
        self._restarted = True
        self._env = env or self._env
        self.log_path = self.log_path.with_name(f"{self.name}-{time.monotonic_ns()}.log")
        self._launch(self._argv(new_ports=False))

    def health(
        self, service: str = "", credentials: grpc.ChannelCredentials | None = None, address: str | None = None
    ) -> int | None:
        """The health status on the gRPC port (or `address`); None when nothing answers."""
        address = address or self.address
        channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        with channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            except grpc.RpcError:
                return None
            return reply.status

    def wait_serving(self, timeout: float = 120, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Wait for SERVING; relaunch on fresh ports when another process took a port between pick and bind."""
        deadline = time.monotonic() + timeout
        relaunches = 3
        while time.monotonic() < deadline:
            if not self.alive():
                if "cannot listen" in self.log() and relaunches:
                    relaunches -= 1
                    self._log.close()
                    self._launch(self._argv(new_ports=not self._restarted))
                    continue
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self.health(credentials=credentials) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not SERVING after {timeout}s:\n{self.log()[-3000:]}")

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample from /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


class TorchrunService(Service):
    """`torchrun --nproc-per-node=N -m imagegen.cli serve denoiser ...`: every rank runs the command, rank 0
    serves (as the Helm chart runs a denoiser group)."""

    def __init__(self, name: str, nproc: int, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.nproc = nproc
        super().__init__(name, "denoiser", args, log_dir, env)

    def _argv(self, new_ports: bool = True) -> list[str]:
        argv = super()._argv(new_ports)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={self.nproc}"]
        torchrun += [f"--master-port={free_port()}", "-m"]
        return [*torchrun, *argv[argv.index("-m") + 1 :]]


class RedisServer(Process):
    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        name = f"redis-{self.port}-{time.monotonic_ns()}"  # a restart on the same port gets a log of its own
        super().__init__(name, argv, log_dir, env=dict(os.environ))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.port} did not answer PING:\n{self.log()}")


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (e.g. the internal token of `serve all`'s stages) to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


INTERNAL_TOKEN = "test-internal-token-0123456789"  # `serve all`'s stages require it (issue 20)


def internal_channel(address: str, token: str = INTERNAL_TOKEN) -> grpc.Channel:
    """A plaintext channel to a stage that sends the internal token."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _Metadata((("x-imagegen-internal-token", token),)))


def token_env(folder: Path, token: str = INTERNAL_TOKEN, **extra: str) -> dict[str, str]:
    """A service environment whose internal token is `token` (in a file under `folder`)."""
    path = folder / "internal-token"
    path.write_text(token + "\n")
    return service_env(IMAGEGEN_INTERNAL_TOKEN_FILE=str(path), **extra)
