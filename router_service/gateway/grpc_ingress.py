"""The gRPC front: `moe.v1.Gateway` and grpc.health.v1 on the gateway's deployment.

Thin by design: each RPC admits the caller (TLS, bearer token), decodes the request (the rules are
in `router_service.validation`), calls the RouterClient and encodes the reply. Every error a caller
can cause becomes a status code with a one-line message (`_status`); nothing else leaks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.handle import DeploymentHandle

from moe.v1 import gateway_pb2
from moe_core.codec import encode
from moe_core.config import MoEConfig
from moe_core.tokenizer import load_tokenizer
from router_service import security, validation
from router_service.engine import Overloaded
from router_service.gateway.admission import ClientShare, client_id
from router_service.gateway.router_client import RouterClient, RouterUnavailable, service_error
from router_service.replica_pool import ExpertsUnavailable
from router_service.sampling import SamplingParams
from router_service.validation import RequestError

log = logging.getLogger("ray.serve")
REPLY_HEADER_BYTES = 4096  # a ScoreChunk's fields besides the logits' data, with room to spare


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps what can go wrong behind the gateway to what the caller is told."""
    e = service_error(e)
    if isinstance(e, RequestError):
        return e.code, e.message
    if isinstance(e, ValueError):  # the engine's own request checks (the gateway's come first)
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}"
    if isinstance(e, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(e, (ExpertsUnavailable, RouterUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    log.error("unexpected error behind the gateway: %r", e)  # a fault of ours: logged, never shown
    return grpc.StatusCode.UNAVAILABLE, "router unavailable, retry shortly"


class _Fail(Exception):
    """Raised after the status is set on the context; Serve passes the code and details on."""


@contextlib.contextmanager
def _statuses(grpc_context):
    """An RPC's body: an error in it sets the call's status and message (`_status`)."""
    try:
        yield
    except Exception as e:
        code, message = _status(e)
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        raise _Fail(message) from None


class GrpcGateway:
    """The servicer of moe.v1.Gateway and grpc.health.v1 (the deployment adds the OpenAI routes)."""

    def __init__(self, router: DeploymentHandle, model_dir: str, request_timeout_s: float = 300.0, *,
                 max_request_bytes: int = validation.MAX_REQUEST_BYTES, router_wait_s: float = 30.0,
                 auth_token_file: str | None = None, require_tls: bool = False,
                 max_requests_per_client: int | None = None):
        self.client = RouterClient(router, request_timeout_s=request_timeout_s, wait_s=router_wait_s)
        self.cfg = MoEConfig.from_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_request_bytes = max_request_bytes
        self.tokens = security.load_tokens(auth_token_file)
        self.require_tls = require_tls
        self.share = ClientShare(max_requests_per_client)
        log.info("gateway: bearer tokens %s, TLS %s", "required" if self.tokens else "off",
                 "required" if require_tls else "optional")

    def _admit(self, data, cls, grpc_context):
        """Caller checks, then the request message: bytes from the proxy, a message from a handle."""
        if self.require_tls and not security.used_tls(grpc_context):
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "this gateway accepts TLS connections only")
        why = security.check_bearer(grpc_context.invocation_metadata(), self.tokens)
        if why:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, why)
        if not isinstance(data, (bytes, bytearray)):
            return data
        return validation.parse(bytes(data), cls, self.max_request_bytes)

    def _generation(self, data, grpc_context) -> tuple[list[int], SamplingParams]:
        """Generate's and Complete's request, admitted: the prompt's token ids and the sampling."""
        request = self._admit(data, gateway_pb2.GenerateRequest, grpc_context)
        ids = validation.prompt_ids(request, self.cfg, self.tokenizer)
        return ids, validation.sampling_params(request.sampling, len(ids), self.cfg)

    def _client(self, grpc_context) -> str:
        return client_id(grpc_context.invocation_metadata(), grpc_context.peer(), self.tokens)

    async def _tokens(self, ids: list[int], params: SamplingParams, client: str):
        """The router's (token, finish_reason) pairs, holding one of `client`'s share of requests."""
        with self.share.hold(client):
            async with contextlib.aclosing(self.client.tokens(ids, params)) as stream:
                async for item in stream:
                    yield item

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def counters(self) -> dict:
        """For operators and tests, through a Serve handle."""
        return {"resumed": self.client.resumed}

    async def Generate(self, request, grpc_context):
        with _statuses(grpc_context):
            ids, params = self._generation(request, grpc_context)
            async with contextlib.aclosing(self._tokens(ids, params, self._client(grpc_context))) as stream:
                async for token, reason in stream:
                    yield gateway_pb2.GenerateChunk(token_ids=[token], text=self._text([token]),
                                                    finish_reason=reason or "")

    async def Complete(self, request, grpc_context) -> gateway_pb2.GenerateReply:
        with _statuses(grpc_context):
            ids, params = self._generation(request, grpc_context)
            tokens, reason = [], ""
            async with contextlib.aclosing(self._tokens(ids, params, self._client(grpc_context))) as stream:
                async for token, reason in stream:
                    tokens.append(token)
            return gateway_pb2.GenerateReply(token_ids=tokens, text=self._text(tokens), finish_reason=reason,
                                             prompt_tokens=len(ids))

    def _score_ids(self, data, grpc_context) -> list[int]:
        request = self._admit(data, gateway_pb2.ScoreRequest, grpc_context)
        return validation.check_token_ids(request.token_ids, self.cfg, "token_ids")

    def _rows_per_message(self) -> int:
        """Logit rows (float32 [vocab]) one message may carry within the gateway's message limit."""
        return max(1, (self.max_request_bytes - REPLY_HEADER_BYTES) // (4 * self.cfg.vocab_size))

    async def Score(self, request, grpc_context) -> gateway_pb2.ScoreReply:
        with _statuses(grpc_context):
            ids = self._score_ids(request, grpc_context)
            if len(ids) > self._rows_per_message():
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the logits of {len(ids)} tokens ({len(ids) * 4 * self.cfg.vocab_size} bytes) "
                                   f"exceed the message limit of {self.max_request_bytes}; use ScoreStream")
            with self.share.hold(self._client(grpc_context)):
                return gateway_pb2.ScoreReply(logits=encode(await self.client.score(ids)))

    async def ScoreStream(self, request, grpc_context):
        with _statuses(grpc_context):
            ids = self._score_ids(request, grpc_context)
            with self.share.hold(self._client(grpc_context)):
                logits_TV, n = await self.client.score(ids), self._rows_per_message()
            for row in range(0, len(ids), n):
                yield gateway_pb2.ScoreChunk(logits=encode(logits_TV[row:row + n]), first_row=row)

    async def Stats(self, request, grpc_context) -> gateway_pb2.StatsReply:
        with _statuses(grpc_context):
            self._admit(request, gateway_pb2.StatsRequest, grpc_context)
            return stats_reply(await self.client.stats())

    async def Check(self, request, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once every expert shard has a live replica (RouterClient.serving).
        Needs no token (probes send none) and tells nothing but SERVING or not."""
        with _statuses(grpc_context):
            if isinstance(request, (bytes, bytearray)):
                validation.parse(bytes(request), health_pb2.HealthCheckRequest, self.max_request_bytes)
        serving = await self.client.serving()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Watch(self, request, grpc_context):
        yield await self.Check(request, grpc_context)


def stats_reply(s: dict) -> gateway_pb2.StatsReply:
    """The router's stats dict as a StatsReply."""
    return gateway_pb2.StatsReply(
        layers=[gateway_pb2.LayerStats(layer=L, tokens_per_expert=row) for L, row in enumerate(s["counts"])],
        deployments=[gateway_pb2.DeploymentStats(
            name=name, serves=[{"layer": L, "expert": E} for L, E in pairs],
            replicas=s["replicas"].get(name, 0)) for name, pairs in s["shards"].items()],
        top_k=s["top_k"], tokens_processed=s["tokens"], requests_finished=s["finished"],
        requests_running=s["running"], requests_queued=s["queued"], model=s.get("model", ""),
        deploy_id=s.get("deploy_id", ""))
