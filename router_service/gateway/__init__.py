"""The gateway: the Serve deployment that takes callers' requests and calls the Router deployment.

- `proxy`: what runs in Serve's gRPC proxy (`add_servicers`, named in the Serve configs as
  `router_service.gateway.add_servicers`; the stream idle limit; the proxy's message limit);
- `grpc_ingress`: the moe.v1.Gateway and grpc.health.v1 servicer, and the error -> status mapping;
- `openai_api`: the OpenAI HTTP routes on the same deployment, and `Gateway`, the deployment;
- `router_client`: the calls to the Router (liveness, failover, deadlines, Ray's errors named).
"""
from router_service.gateway.grpc_ingress import GrpcGateway, _status, stats_reply
from router_service.gateway.openai_api import Gateway
from router_service.gateway.proxy import (GENERATED_SERVICER_FUNCTIONS, MAX_MESSAGE_ENV, SERVICER_FUNCTIONS,
                                          STREAM_IDLE_ENV, add_servicers, idle_bounded, proxy_message_limit)
from router_service.gateway.router_client import RouterClient, RouterUnavailable

__all__ = ["GENERATED_SERVICER_FUNCTIONS", "MAX_MESSAGE_ENV", "SERVICER_FUNCTIONS", "STREAM_IDLE_ENV", "Gateway",
           "GrpcGateway", "RouterClient", "RouterUnavailable", "_status", "add_servicers", "idle_bounded",
           "proxy_message_limit", "stats_reply"]
