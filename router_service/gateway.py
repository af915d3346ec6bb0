"""The gateway: Ray Serve's gRPC ingress for `moe.v1.Gateway` (plus grpc.health.v1).

Thin by design: authenticate, validate, tokenize, call the router deployment, encode the reply.
Every error a caller can cause becomes a status code with a one-line message; nothing else leaks.

Requests reach the deployment as the raw bytes the caller sent (`add_servicers` registers the
services without a request deserializer): gRPC would otherwise parse them inside Serve's proxy and
answer a corrupt message with UNKNOWN; here it is INVALID_ARGUMENT, and an oversized one is refused
before it is parsed.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from moe.v1 import gateway_pb2
from moe_core.codec import encode
from moe_core.config import MoEConfig
from moe_core.tokenizer import load_tokenizer
from router_service import security, validation
from router_service.engine import Overloaded
from router_service.replica_pool import ExpertsUnavailable
from router_service.sampling import SamplingParams
from router_service.validation import RequestError

log = logging.getLogger("ray.serve")

SERVICER_FUNCTIONS = ["router_service.gateway.add_servicers", "router_service.security.serve_tls"]
# What earlier configs listed; registering them beside add_servicers would register the services twice.
GENERATED_SERVICER_FUNCTIONS = ["moe.v1.gateway_pb2_grpc.add_GatewayServicer_to_server",
                                "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


# Serve's proxy takes messages up to this (both ways) and buffers a request whole before the gateway
# sees it; read in the proxy's process when it starts. deploy() sets it (proxy_message_limit).
MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
GRPC_MAX_MESSAGE = (1 << 31) - 1
# A Generate stream whose client takes no message for this long is ended (proxy environment).
STREAM_IDLE_ENV = "MOE_SERVE_STREAM_IDLE_S"
STREAM_IDLE_S = 30.0


def proxy_message_limit(cfg: MoEConfig, max_request_bytes: int) -> int:
    """Serve's proxy message limit, which caps replies too: the gateway's request limit, or the
    largest reply (a Score of a full context: float32 logits), whichever is larger; at most gRPC's."""
    score_reply = cfg.max_position_embeddings * cfg.vocab_size * 4 + 64
    return min(max(max_request_bytes, score_reply), GRPC_MAX_MESSAGE)


def add_servicers(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: moe.v1.Gateway and grpc.health.v1.Health, requests as bytes.

    In Serve's proxy the Gateway's handlers are Serve's own (they call this deployment), with one
    change: Generate's messages are written with a time limit each (`idle_bounded`)."""
    services = {
        "moe.v1.Gateway": {"Generate": grpc.unary_stream_rpc_method_handler,
                           "Complete": grpc.unary_unary_rpc_method_handler,
                           "Score": grpc.unary_unary_rpc_method_handler,
                           "Stats": grpc.unary_unary_rpc_method_handler},
        "grpc.health.v1.Health": {"Check": grpc.unary_unary_rpc_method_handler,
                                  "Watch": grpc.unary_stream_rpc_method_handler},
    }
    for service, methods in services.items():
        if service == "moe.v1.Gateway" and hasattr(server, "service_handler_factory"):
            handlers = _proxy_handlers(server, service, methods)
        else:
            handlers = {name: make(getattr(servicer, name)) for name, make in methods.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        if hasattr(server, "add_registered_method_handlers"):
            server.add_registered_method_handlers(service, handlers)


def _proxy_handlers(server, service: str, methods: dict) -> dict:
    """Serve's proxy handlers for `service`, registered as they are (a passthrough service), the
    server streams among them bounded by idle_bounded."""
    from ray.serve._private.proxy_request_response import gRPCStreamingType
    idle_s = float(os.environ.get(STREAM_IDLE_ENV, STREAM_IDLE_S))
    server.add_passthrough_service(service)
    handlers = {}
    for name, make in methods.items():
        streams = make is grpc.unary_stream_rpc_method_handler
        forward = server.service_handler_factory(
            service_method=f"/{service}/{name}",
            streaming_type=gRPCStreamingType.UNARY_STREAM if streams else gRPCStreamingType.UNARY_UNARY)
        handlers[name] = make(idle_bounded(forward, idle_s) if streams else forward)
    return handlers


def idle_bounded(stream, idle_s: float):
    """A server-stream handler that writes `stream`'s messages itself, each within `idle_s`. A client
    that reads nothing for that long (its flow-control window stays shut) gets DEADLINE_EXCEEDED
    after what it was already sent; the messages still to come are dropped and the call behind
    them is cancelled, so its generation stops and frees its slot. A client that cancels
    cancels that call at once too."""
    async def handler(request, context):
        queue: asyncio.Queue = asyncio.Queue()

        async def pull():
            try:
                async for message in stream(request, context):
                    queue.put_nowait(message)
            finally:
                queue.put_nowait(None)

        puller = asyncio.ensure_future(pull())
        try:
            while (message := await queue.get()) is not None:
                try:
                    await asyncio.wait_for(context.write(message), idle_s)
                except asyncio.TimeoutError:
                    puller.cancel()
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"stream closed: the client read nothing for {idle_s:g} s")
            await puller
        finally:
            puller.cancel()
    return handler


class RouterUnavailable(RuntimeError):
    """No router replica took the call in time (dead, restarting, or not deployed)."""


def _cause(e: BaseException) -> BaseException:
    """Ray re-raises a router's exception as a RayTaskError subclass of the cause's class whose
    str() carries the remote traceback; the cause itself has just the message."""
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps what can go wrong behind the gateway to what the caller is told."""
    e = _cause(e)
    if isinstance(e, RequestError):
        return e.code, e.message
    if isinstance(e, ValueError):  # the engine's own request checks (the gateway's come first)
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}"
    if isinstance(e, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded: too many requests queued"
    if isinstance(e, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(e, (ExpertsUnavailable, RouterUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, (asyncio.CancelledError, RequestCancelledError)):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    # What is left is Ray failing to reach the router, or a fault of ours: logged, never shown.
    if not isinstance(e, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        log.error("unexpected error behind the gateway: %r", e)
    return grpc.StatusCode.UNAVAILABLE, "router unavailable, retry shortly"


class _Fail(Exception):
    """Raised after the status is set on the context; Serve passes the code and details on."""


def _fail(ctx, e: BaseException):
    code, message = _status(e)
    ctx.set_code(code)
    ctx.set_details(message)
    raise _Fail(message) from None


# Replica states in which a router replica takes calls.
LIVE_STATES = ("RUNNING", "PENDING_MIGRATION")
ROUTER_GRACE_S = 1.0
HEALTH_TTL_S = 1.0  # health Checks are answered from a state at most this old (plus one look's time)
MAX_RESUMES = 3  # generations moved to another router replica, per request


@serve.deployment(max_ongoing_requests=2048, health_check_period_s=2)
class Gateway:
    def __init__(self, router: DeploymentHandle, model_dir: str, request_timeout_s: float = 300.0, *,
                 max_request_bytes: int = validation.MAX_REQUEST_BYTES, router_wait_s: float = 30.0,
                 auth_token_file: str | None = None, require_tls: bool = False):
        self.router = router
        self.cfg = MoEConfig.from_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.timeout_s, self.router_wait_s = request_timeout_s, router_wait_s
        self.max_request_bytes = max_request_bytes
        self.tokens = security.load_tokens(auth_token_file)
        self.require_tls = require_tls
        self.router_replicas: int | None = None  # unknown until the watcher's first look
        self._watcher: asyncio.Task | None = None
        self.resumed = 0  # generations moved to another router replica after theirs died
        # Health from a cached state: a flood of (unauthenticated) Checks costs one router call a second.
        self._serving: bool | None = None
        self._serving_at = 0.0
        self._health_look: asyncio.Task | None = None
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

    def _parse(self, request):
        ids = validation.prompt_ids(request, self.cfg, self.tokenizer)
        params = validation.sampling_params(request.sampling, len(ids), self.cfg)
        return ids, params

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def _watch_router(self):
        """Keeps `router_replicas` (running router replicas, as Serve's controller sees them) fresh.
        Zero only after two looks a second apart agree, so a replica passing between states is not
        taken for an absent router."""
        seen = []
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                dep = status.applications[self.router.app_name].deployments[self.router.deployment_name]
                states = dict(dep.replica_states)
                seen = (seen + [sum(states.get(s, 0) for s in LIVE_STATES)])[-2:]
                if max(seen) == 0 and self.router_replicas != 0:
                    log.warning("no running router replica: %s (%s) %s", states, dep.status, dep.message)
                self.router_replicas = max(seen)
            except Exception as e:  # the controller may be restarting: keep the last answer
                log.debug("router status unavailable: %r", e)
            await asyncio.sleep(1.0)

    async def _taken(self, response, wait_s: float | None = None):
        """Waits until a router replica has taken the call. With none running (dead, restarting),
        Serve would hold the call until a new one is up, minutes for a big model: fail within about
        a second with UNAVAILABLE instead, so callers can go elsewhere or retry. router_wait_s bounds
        the wait in any case; under load taking a call can legitimately take seconds, so it is generous."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_router())
        streaming = isinstance(response, DeploymentResponseGenerator)
        taken = asyncio.ensure_future(response._to_object_ref_gen() if streaming else response._to_object_ref())
        start = asyncio.get_running_loop().time()
        deadline = start + (wait_s or self.router_wait_s)
        try:
            while not taken.done():
                now = asyncio.get_running_loop().time()
                # Serve's status can lag its routing: fail fast only once the call has waited a little too.
                absent = self.router_replicas == 0 and now - start >= ROUTER_GRACE_S
                if absent or now >= deadline:
                    why = "no running replica" if absent else f"no replica took the call in {now - start:.0f}s"
                    raise RouterUnavailable(f"router unavailable ({why}), retry shortly")
                await asyncio.wait({taken}, timeout=min(0.25, deadline - now))
            taken.result()
        except BaseException:
            taken.cancel()
            response.cancel()
            raise
        return response

    async def _tokens(self, ids: list[int], params: SamplingParams):
        """The router's tokens for one request. Should the router replica generating them die, the
        generation resumes on another one (up to MAX_RESUMES times, within the request's time):
        greedy and seeded requests are replayed from the start, and the tokens already sent are
        checked and skipped (the engine's tokens do not depend on batching); others continue from
        the prompt plus the tokens sent. A caller that leaves early (cancelled, past its deadline,
        disconnected: Serve then cancels this call) or fails also stops the generation behind it;
        Ray does not pass that on by itself. The engine then drops the sequence and, if it was
        alone in its step, cancels the step's expert calls."""
        loop = asyncio.get_running_loop()
        deadline, sent, resumes, finished = loop.time() + self.timeout_s, [], 0, False
        replay = params.temperature == 0 or params.seed is not None
        while True:
            prompt, p = ids, params
            if sent and not replay:
                prompt, p = ids + sent, dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(sent))
            skip = list(sent) if replay else []
            stream = self.router.options(stream=True).generate.remote(prompt, p.__dict__, deadline - loop.time())
            try:
                await self._taken(stream)
                async for token, reason in stream:
                    if skip:
                        if token != skip.pop(0):
                            raise RouterUnavailable("router unavailable (a resumed generation diverged), retry")
                        continue
                    sent.append(token)
                    finished = reason is not None
                    yield token, reason
                if skip:
                    raise RouterUnavailable("router unavailable (a resumed generation ended early), retry")
                return
            except Exception as e:
                stream.cancel()
                if finished:  # the caller has every token: nothing to resume
                    return
                if not isinstance(_cause(e), (RayActorError, ActorUnavailableError)) or resumes == MAX_RESUMES \
                        or loop.time() >= deadline:
                    raise
                resumes += 1
                self.resumed += 1
                log.warning("router replica lost mid-generation (%r); resuming after %d tokens", e, len(sent))
            except BaseException:
                stream.cancel()
                raise

    async def _unary(self, response, wait_s: float | None = None):
        try:
            return await (await self._taken(response, wait_s))
        except asyncio.CancelledError:
            response.cancel()
            raise

    def counters(self) -> dict:
        """For operators and tests, through a Serve handle."""
        return {"resumed": self.resumed}

    async def Generate(self, request, grpc_context):
        try:
            request = self._admit(request, gateway_pb2.GenerateRequest, grpc_context)
            async with contextlib.aclosing(self._tokens(*self._parse(request))) as stream:
                async for token, reason in stream:
                    yield gateway_pb2.GenerateChunk(token_ids=[token], text=self._text([token]),
                                                    finish_reason=reason or "")
        except Exception as e:
            _fail(grpc_context, e)

    async def Complete(self, request, grpc_context) -> gateway_pb2.GenerateReply:
        try:
            request = self._admit(request, gateway_pb2.GenerateRequest, grpc_context)
            tokens, reason = [], ""
            ids, params = self._parse(request)
            async with contextlib.aclosing(self._tokens(ids, params)) as stream:
                async for token, reason in stream:
                    tokens.append(token)
            return gateway_pb2.GenerateReply(token_ids=tokens, text=self._text(tokens), finish_reason=reason,
                                             prompt_tokens=len(ids))
        except Exception as e:
            _fail(grpc_context, e)

    async def Score(self, request, grpc_context) -> gateway_pb2.ScoreReply:
        try:
            request = self._admit(request, gateway_pb2.ScoreRequest, grpc_context)
            ids = validation.check_token_ids(request.token_ids, self.cfg, "token_ids")
            logits = await self._unary(self.router.score.remote(ids, self.timeout_s))
            return gateway_pb2.ScoreReply(logits=encode(logits))
        except Exception as e:
            _fail(grpc_context, e)

    async def Stats(self, request, grpc_context) -> gateway_pb2.StatsReply:
        try:
            self._admit(request, gateway_pb2.StatsRequest, grpc_context)
            s = await self._unary(self.router.stats.remote())
        except Exception as e:
            _fail(grpc_context, e)
        return stats_reply(s)

    async def Check(self, request, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once every expert shard has a live replica, from a state at most
        HEALTH_TTL_S old. Needs no token (probes send none) and tells nothing but SERVING or not."""
        try:
            if isinstance(request, (bytes, bytearray)):
                validation.parse(bytes(request), health_pb2.HealthCheckRequest, self.max_request_bytes)
        except Exception as e:
            _fail(grpc_context, e)
        loop = asyncio.get_running_loop()
        if (self._health_look is None or self._health_look.done()) and loop.time() - self._serving_at >= HEALTH_TTL_S:
            self._health_look = loop.create_task(self._look_health())
        if self._serving is None:  # nothing known yet: this Check waits for the first look
            await asyncio.shield(self._health_look)
        status = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def _look_health(self) -> None:
        """Asks the router whether every expert shard has a live replica (one look for all Checks)."""
        try:
            ready = await self._unary(self.router.ready.remote(), min(self.router_wait_s, 4.0))
        except Exception:
            ready = {"router": 0}
        self._serving = all(n > 0 for n in ready.values())
        self._serving_at = asyncio.get_running_loop().time()

    async def Watch(self, request, grpc_context):
        yield await self.Check(request, grpc_context)


def stats_reply(s: dict) -> gateway_pb2.StatsReply:
    return gateway_pb2.StatsReply(
        layers=[gateway_pb2.LayerStats(layer=L, tokens_per_expert=row) for L, row in enumerate(s["counts"])],
        deployments=[gateway_pb2.DeploymentStats(
            name=name, serves=[{"layer": L, "expert": E} for L, E in pairs],
            replicas=s["replicas"].get(name, 0)) for name, pairs in s["shards"].items()],
        top_k=s["top_k"], tokens_processed=s["tokens"], requests_finished=s["finished"],
        requests_running=s["running"], requests_queued=s["queued"], model=s.get("model", ""),
        deploy_id=s.get("deploy_id", ""))
