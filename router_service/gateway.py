"""The gateway: Ray Serve's gRPC ingress for `moe.v1.Gateway` (plus grpc.health.v1).

Thin by design: validate, tokenize, call the router deployment, encode the reply. Every error a
caller can cause becomes a status code with a one-line message; nothing else leaks.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from moe.v1 import gateway_pb2
from moe_core.codec import encode
from moe_core.config import MoEConfig
from moe_core.tokenizer import load_tokenizer
from router_service import validation
from router_service.engine import Overloaded
from router_service.grpc_dispatch import ExpertsUnavailable
from router_service.validation import RequestError

log = logging.getLogger("ray.serve")

SERVICER_FUNCTIONS = [
    "moe.v1.gateway_pb2_grpc.add_GatewayServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps what can go wrong behind the gateway to what the caller is told."""
    if isinstance(e, RequestError):
        return e.code, e.message
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}"
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(e, ExpertsUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    # Ray re-raises a router's exception as an instance of its cause's class, so the checks above
    # catch those; what is left is Ray itself failing to reach the router.
    if isinstance(e, (RayActorError, ActorUnavailableError, DeploymentUnavailableError, BackPressureError)):
        return grpc.StatusCode.UNAVAILABLE, "router unavailable, retry shortly"
    log.error("unexpected error behind the gateway: %r", e)
    return grpc.StatusCode.UNAVAILABLE, "service temporarily unavailable"


class _Fail(Exception):
    """Raised after the status is set on the context; Serve passes the code and details on."""


def _fail(ctx, e: BaseException):
    code, message = _status(e)
    ctx.set_code(code)
    ctx.set_details(message)
    raise _Fail(message) from None


@serve.deployment(max_ongoing_requests=2048, health_check_period_s=2)
class Gateway:
    def __init__(self, router: DeploymentHandle, model_dir: str, request_timeout_s: float = 300.0):
        self.router = router
        self.cfg = MoEConfig.from_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.timeout_s = request_timeout_s

    def _parse(self, request):
        ids = validation.prompt_ids(request, self.cfg, self.tokenizer)
        params = validation.sampling_params(request.sampling, len(ids), self.cfg)
        return ids, params

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def Generate(self, request: gateway_pb2.GenerateRequest, grpc_context):
        try:
            ids, params = self._parse(request)
            stream = self.router.options(stream=True).generate.remote(ids, params.__dict__, self.timeout_s)
            async for token, reason in stream:
                yield gateway_pb2.GenerateChunk(token_ids=[token], text=self._text([token]), finish_reason=reason or "")
        except Exception as e:
            _fail(grpc_context, e)

    async def Complete(self, request: gateway_pb2.GenerateRequest, grpc_context) -> gateway_pb2.GenerateReply:
        try:
            ids, params = self._parse(request)
            tokens, reason = [], ""
            async for token, reason in self.router.options(stream=True).generate.remote(ids, params.__dict__, self.timeout_s):
                tokens.append(token)
            return gateway_pb2.GenerateReply(token_ids=tokens, text=self._text(tokens), finish_reason=reason,
                                             prompt_tokens=len(ids))
        except Exception as e:
            _fail(grpc_context, e)

    async def Score(self, request: gateway_pb2.ScoreRequest, grpc_context) -> gateway_pb2.ScoreReply:
        try:
            ids = validation.check_token_ids(request.token_ids, self.cfg, "token_ids")
            logits = await self.router.score.remote(ids, self.timeout_s)
            return gateway_pb2.ScoreReply(logits=encode(logits))
        except Exception as e:
            _fail(grpc_context, e)

    async def Stats(self, request: gateway_pb2.StatsRequest, grpc_context) -> gateway_pb2.StatsReply:
        try:
            s = await self.router.stats.remote()
        except Exception as e:
            _fail(grpc_context, e)
        return stats_reply(s)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once every expert shard has a live replica."""
        try:
            ready = await self.router.ready.remote()
        except Exception:
            ready = {"router": 0}
        serving = all(n > 0 for n in ready.values())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        yield await self.Check(request, grpc_context)


def stats_reply(s: dict) -> gateway_pb2.StatsReply:
    return gateway_pb2.StatsReply(
        layers=[gateway_pb2.LayerStats(layer=L, tokens_per_expert=row) for L, row in enumerate(s["counts"])],
        deployments=[gateway_pb2.DeploymentStats(
            name=name, serves=[{"layer": L, "expert": E} for L, E in pairs],
            replicas=s["replicas"].get(name, 0)) for name, pairs in s["shards"].items()],
        top_k=s["top_k"], tokens_processed=s["tokens"], requests_finished=s["finished"],
        requests_running=s["running"], requests_queued=s["queued"])
