"""ImageService, the public API: authenticates, validates and runs requests through the stage services.

Admission, in order: the API key (from the metadata, before the message is read: `auth.KeyInterceptor`), the
key's in-flight quota, validation, the cost model (`--max-request-work`) and the key's work-per-minute quota, then
a fair turn among `--max-active-requests` (`common.serving.quota`); a caller's deadline is cut to --max-timeout.
"""

from __future__ import annotations

import argparse
import math

import grpc

from imagegen.common.serving.auth import ApiKeys, KeyInterceptor
from imagegen.common.serving.config import limits_from_args
from imagegen.common.serving.gateway import Gateway
from imagegen.common.serving.handlers import rpc
from imagegen.common.serving.quota import ANONYMOUS, QuotaConfig, Quotas, check_work
from imagegen.common.serving.retry import Deadline, RetryPolicy
from imagegen.common.serving.routes import Route, RouteTable, parse_routes
from imagegen.common.serving.server import Service
from imagegen.common.serving.status import RpcFailure
from imagegen.common.serving.tls import TlsConfig
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc

SERVICE = "imagegen.v1.ImageService"


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(
        self,
        gateway: Gateway,
        keys: ApiKeys | None,
        policy: RetryPolicy,
        default_timeout: float,
        max_timeout: float = math.inf,
        max_work: float = 0.0,
        quotas: Quotas | None = None,
    ) -> None:
        self.gateway = gateway
        self.keys = keys
        self.policy = policy
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout
        self.max_work = max_work
        self.quotas = quotas or Quotas(QuotaConfig(key_in_flight=0, max_active=0))

    def _authenticate(self, context) -> str:
        """The caller's key id (ANONYMOUS without keys); UNAUTHENTICATED without a valid key."""
        if self.keys is None:
            return ANONYMOUS
        return self.keys.check(context.invocation_metadata())

    def _deadline(self, context) -> Deadline:
        """The caller's deadline (or the default), never more than --max-timeout away."""
        asked = context.time_remaining()
        seconds = self.default_timeout if asked is None else asked
        return Deadline(min(seconds, self.max_timeout))

    async def _events(self, request, context, images, progress: bool = True):
        key = self._authenticate(context)
        with self.quotas.hold(key):  # QUOTA_IN_FLIGHT before anything is decoded or waited for
            deadline = self._deadline(context)
            # One budget for every stage call of this request, within its deadline.
            budget = self.policy.budget(deadline)
            job = await self.gateway.validate(request, images, budget)
            self.quotas.charge(key, check_work(job.resolved, self.max_work))
            async with self.quotas.turn(key, deadline.left()):
                async for event in self.gateway.run(job, budget, progress):
                    yield event

    async def _unary(self, request, context, images) -> image_service_pb2.ImageResponse:
        async for event in self._events(request, context, images, progress=False):
            if isinstance(event, image_service_pb2.ImageResponse):
                return event
        raise RpcFailure(grpc.StatusCode.INTERNAL, "the request ended without a response")

    async def _stream(self, request, context, images):
        async for event in self._events(request, context, images):
            if isinstance(event, image_service_pb2.ImageResponse):
                yield image_service_pb2.ImageEvent(result=event)
            else:
                yield image_service_pb2.ImageEvent(progress=event)

    @rpc(SERVICE)
    async def GenerateImage(self, request, context):
        return await self._unary(request, context, ())

    @rpc(SERVICE)
    async def EditImage(self, request, context):
        return await self._unary(request, context, request.images)

    @rpc(SERVICE)
    async def GenerateImageStream(self, request, context):
        async for event in self._stream(request, context, ()):
            yield event

    @rpc(SERVICE)
    async def EditImageStream(self, request, context):
        async for event in self._stream(request, context, request.images):
            yield event

    @rpc(SERVICE)
    async def ListModels(self, request, context):
        self._authenticate(context)
        models = []
        for route in self.gateway.routes.routes:
            if route.family is None:
                continue  # not reachable yet
            models.append(_summary(route))
        return image_service_pb2.ListModelsResponse(models=models, default_model=self.gateway.routes.default_name())


def _summary(route: Route) -> image_service_pb2.ModelSummary:
    """What a request that sets nothing gets from this model: the deployment's defaults over the family's."""
    family, model = route.family, route.model_defaults
    size = family.defaults.size or 0  # 0: from the input image
    summary = image_service_pb2.ModelSummary(
        model_id=route.name,
        family=family.name,
        takes_images=family.takes_images,
        default_steps=_first(model.steps, family.defaults.steps),
        default_guidance_scale=_first(model.guidance_scale, family.defaults.guidance_scale),
        loras=route.infos["denoiser"].loras if "denoiser" in route.infos else [],
        default_width=_first(model.width, size),
        default_height=_first(model.height, size),
    )
    negative = _first(model.negative_prompt, family.defaults.default_negative_prompt)
    if negative is not None:
        summary.default_negative_prompt = negative
    return summary


def _first(*values):
    return next((v for v in values if v is not None), None)


def make_service(args: argparse.Namespace, tls: TlsConfig) -> Service:
    if args.routes:
        table = parse_routes(args.routes)
    else:
        table = {args.default_model: {"encoder": args.encoder, "denoiser": args.denoiser, "vae": args.vae}}
    keys = ApiKeys(args.api_keys_file, args.min_key_length) if args.api_keys_file else None
    limits = limits_from_args(args)
    policy = RetryPolicy()
    routes = RouteTable(table, args.default_model, tls, policy, args.max_message_bytes)
    quotas = Quotas(
        QuotaConfig(args.key_max_in_flight, args.key_work_per_minute, args.max_active_requests)
        if keys is not None
        else QuotaConfig(key_in_flight=0, max_active=args.max_active_requests)  # one tenant: no per-key quota
    )
    gateway = Gateway(routes, limits, args.max_decoded_bytes)
    servicer = ImageServicer(
        gateway, keys, policy, args.default_timeout, args.max_timeout, args.max_request_work, quotas
    )
    # Room for the largest allowed request: every input image at the byte limit, plus the options.
    max_receive_bytes = min(args.max_images * args.max_input_bytes + (1 << 20), 2**31 - 1)
    return Service(
        name=SERVICE,
        register=lambda server: image_service_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server),
        prepare=routes.discover,
        close=routes.close,
        internal=False,
        max_receive_bytes=max_receive_bytes,
        listeners=[_http_listener(args, servicer, keys)] if args.http_port else [],
        # The key is checked from the metadata before the message is read (the servicer checks it again for
        # the key's quotas); the RPCs in flight are bounded.
        interceptors=[KeyInterceptor(keys)] if keys is not None else [],
        max_concurrent_rpcs=args.max_concurrent_rpcs,
    )


def _http_listener(args: argparse.Namespace, servicer: ImageServicer, keys: ApiKeys | None):
    """The OpenAI-compatible HTTP API (--http-port) over this servicer, with the public port's TLS."""
    from imagegen.common.serving.admission import AdmissionConfig
    from imagegen.services.http_api import build_app  # FastAPI only where HTTP is on
    from imagegen.services.http_server import ConnectionLimits, HttpListener

    admission = AdmissionConfig.from_args(args, keys)
    app = build_app(servicer, admission, args.max_images)
    limits = ConnectionLimits(args.http_max_connections, args.http_header_timeout, args.http_keep_alive)
    return HttpListener(app, args.host, args.http_port, args.tls_cert, args.tls_key, limits)
