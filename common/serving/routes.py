"""The gateway's model table: which encoder/denoiser/VAE serve each model id, and what family they host.

Families are learned from the backends' `Describe` (so the gateway validates requests without loading a
model); a route is usable once its three backends answered and agree on the family. The gateway is ready once
its default route is: other routes are described in the background and on their first request, so one model
whose backends are down does not keep the gateway (and every other model) unready.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import grpc
from imagegen_client.transport import DEFAULT_MESSAGE_LIMIT

from imagegen.common.errors import InvalidArgument
from imagegen.common.families import Family, get_family
from imagegen.common.options import ModelDefaults
from imagegen.common.serving.channels import call_with_retries, internal_channel
from imagegen.common.serving.config import ConfigError
from imagegen.common.serving.convert import model_defaults_from_proto
from imagegen.common.serving.echo import clip
from imagegen.common.serving.retry import Deadline, RetryBudget, RetryPolicy
from imagegen.common.serving.status import RpcFailure
from imagegen.common.serving.tls import TlsConfig
from imagegen.v1 import common_pb2, denoiser_pb2_grpc, encoder_pb2_grpc, vae_pb2_grpc

log = logging.getLogger("imagegen.routes")
STAGES = ("encoder", "denoiser", "vae")
DESCRIBE_TIMEOUT = 5.0


def parse_routes(text: str) -> dict[str, dict[str, str]]:
    """`--routes` JSON -> {model id: {"encoder": addr, "denoiser": addr, "vae": addr}}."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--routes: not JSON ({exc})") from exc
    if not isinstance(table, dict) or not table:
        raise ConfigError("--routes: expected a non-empty object {MODEL_ID: {encoder, denoiser, vae}}")
    for model, backends in table.items():
        if not isinstance(backends, dict) or set(backends) != set(STAGES):
            raise ConfigError(f"--routes: {model!r} needs exactly the keys encoder, denoiser, vae")
        if not all(isinstance(a, str) and a for a in backends.values()):
            raise ConfigError(f"--routes: {model!r} has an empty or non-string address")
    return table


@dataclass
class Route:
    name: str | None  # the id requests use; None until learned from the backends (flag-configured route)
    addresses: dict[str, str]
    tls: TlsConfig
    family: Family | None = None
    infos: dict[str, common_pb2.ModelInfo] = field(default_factory=dict)
    max_receive_bytes: int = DEFAULT_MESSAGE_LIMIT

    def __post_init__(self) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}

    def _connect(self) -> None:
        """Open the channels (inside the running event loop, which aio channels bind to)."""
        if self.channels:
            return
        self.channels = {
            stage: internal_channel(self.addresses[stage], self.tls, self.max_receive_bytes) for stage in STAGES
        }
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(self.channels["encoder"])
        self.denoiser = denoiser_pb2_grpc.DenoiserServiceStub(self.channels["denoiser"])
        self.vae = vae_pb2_grpc.VaeServiceStub(self.channels["vae"])

    @property
    def denoiser_reads_cache(self) -> bool:
        return self.infos["denoiser"].reads_cache

    @property
    def model_defaults(self) -> ModelDefaults:
        """The deployment's request defaults, as its denoiser announced them (none before it answered)."""
        info = self.infos.get("denoiser")
        return model_defaults_from_proto(info.defaults) if info is not None else ModelDefaults()

    async def describe(self, budget: RetryBudget) -> Family:
        """Ask the three backends what they host (once answered, later calls return the answer), waiting for
        them within `budget`. Not serialised: a request must not wait out someone else's attempt past its own
        deadline, and a duplicate Describe is cheap."""
        if self.family is not None:
            return self.family
        self._connect()
        stubs = {"encoder": self.encoder, "denoiser": self.denoiser, "vae": self.vae}
        infos = {}
        for stage, stub in stubs.items():
            try:
                infos[stage] = await call_with_retries(stub.Describe, common_pb2.DescribeRequest(), stage, budget)
            except grpc.aio.AioRpcError as exc:
                # The backend's address goes to the log, not to the (possibly public) caller.
                where = f"{stage} of model {self.name or '(default)'}"
                log.warning("backend not ready", extra={"backend": where, "address": self.addresses[stage]})
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RpcFailure(exc.code(), f"{where}: not ready in time") from exc
                raise budget.failure(exc, f"{where}: ") from exc
        families = {stage: info.family for stage, info in infos.items()}
        if len(set(families.values())) != 1:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"backends disagree on the family: {families}")
        if self.family is None:
            self.infos = infos
            self.name = self.name or infos["denoiser"].model_id
            self.family = get_family(infos["denoiser"].family)
            log.info("route ready", extra={"model": self.name, "family": self.family.name, **self.addresses})
        return self.family

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


class RouteTable:
    def __init__(
        self,
        table: dict[str | None, dict[str, str]],
        default_model: str | None,
        tls: TlsConfig,
        policy: RetryPolicy,
        max_receive_bytes: int = DEFAULT_MESSAGE_LIMIT,
    ) -> None:
        self.routes = [
            Route(name, addresses, tls, max_receive_bytes=max_receive_bytes) for name, addresses in table.items()
        ]
        self.policy = policy
        self._background: asyncio.Task | None = None
        if default_model is None and len(self.routes) > 1:
            raise ConfigError("--default-model is required with several --routes")
        if default_model is not None and None not in table and default_model not in table:
            raise ConfigError(f"--default-model {default_model!r} is not in --routes")
        self.default_model = default_model

    def _default(self) -> Route:
        if self.default_model is None:
            return self.routes[0]
        return next(r for r in self.routes if r.name in (self.default_model, None))

    async def get(self, model: str, budget: RetryBudget) -> tuple[Route, Family]:
        """The route for a request's `model` field ("" = default), described if it was not yet."""
        if not model:
            route = self._default()
        else:
            matches = [r for r in self.routes if r.name == model]
            if not matches:
                # The flag-configured route learns its name on first contact.
                for route in self.routes:
                    if route.name is None:
                        await route.describe(budget)
                matches = [r for r in self.routes if r.name == model]
            if not matches:
                known = ", ".join(sorted(r.name for r in self.routes if r.name)) or "none yet"
                raise InvalidArgument("model", f"unknown model {clip(model)!r} (served: {clip(known, 512)})")
            route = matches[0]
        return route, await route.describe(budget)

    async def discover(self) -> None:
        """Describe the default route, waiting until it answers (the gateway reports SERVING after this); the
        others are described in the background."""
        await self._describe_until_ready(self._default())
        others = [r for r in self.routes if r is not self._default()]
        if others:
            self._background = asyncio.create_task(self._describe_all(others))

    async def _describe_all(self, routes: list[Route]) -> None:
        await asyncio.gather(*(self._describe_until_ready(r) for r in routes))

    async def _describe_until_ready(self, route: Route, interval: float = 0.5, max_interval: float = 5.0) -> None:
        while True:
            try:
                await route.describe(self.policy.budget(Deadline(DESCRIBE_TIMEOUT)))
                return
            except RpcFailure as exc:
                log.warning("waiting for backends", extra={"model": route.name, "error": exc.message})
            await asyncio.sleep(interval)
            interval = min(max_interval, interval * 2)

    def default_name(self) -> str:
        return self._default().name or ""

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
        for route in self.routes:
            await route.close()
