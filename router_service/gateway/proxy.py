"""What the gateway runs in Serve's gRPC proxy: the services registered with requests as bytes, a
time limit on each message a Generate stream writes, and the proxy's message limit.

Requests reach the deployment as the raw bytes the caller sent (`add_servicers` registers the
services without a request deserializer): gRPC would otherwise parse them inside Serve's proxy and
answer a corrupt message with UNKNOWN; the deployment answers INVALID_ARGUMENT, and refuses an
oversized one before it is parsed.

Private Serve API: the proxy's server (`service_handler_factory`, `add_passthrough_service`) and
`gRPCStreamingType`. A `grpc_servicer_functions` entry is handed that server, and Serve has no
public way to wrap the handlers it forwards calls with; `_proxy_handlers` is the one place.
"""
from __future__ import annotations

import asyncio
import os

import grpc


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


def proxy_message_limit(max_request_bytes: int) -> int:
    """Serve's proxy message limit, both ways: the gateway's request limit. Every reply fits it too
    (logits longer than a message go by ScoreStream, in chunks), so an unauthenticated caller can
    make the proxy hold no more than that, compressed or not (gRPC bounds what it inflates by it)."""
    return min(max_request_bytes, GRPC_MAX_MESSAGE)


def add_servicers(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: moe.v1.Gateway and grpc.health.v1.Health, requests as bytes.

    In Serve's proxy the Gateway's handlers are Serve's own (they call this deployment), with one
    change: the streams' messages are written with a time limit each (`idle_bounded`)."""
    services = {
        "moe.v1.Gateway": {"Generate": grpc.unary_stream_rpc_method_handler,
                           "Complete": grpc.unary_unary_rpc_method_handler,
                           "Score": grpc.unary_unary_rpc_method_handler,
                           "ScoreStream": grpc.unary_stream_rpc_method_handler,
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
