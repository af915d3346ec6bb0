"""The Serve application: expert deployments, the router, the gateway, composed with .bind().

`cluster/serve.yaml` points at `router_service.app:build_app`; its `deployments:` section edits
any one of them by name (autoscaling, num_gpus) without touching code.
"""
from __future__ import annotations

from ray import serve

from expert_service.deployment import ExpertReplica, shard_plan
from expert_service.directory import DEFAULT_NAME
from moe_core.config import MoEConfig
from router_service.gateway import Gateway
from router_service.router import Router


def build_app(args: dict) -> serve.Application:
    """args: model (dir, required), layers_per_shard, expert_dtype, router_device ("auto": cuda when
    the Router deployment's num_gpus gave it a GPU, else cpu; or a torch device), router_dtype
    ("float32"; "bfloat16" on GPUs), directory, max_running, max_queued, expert_timeout_s,
    request_timeout_s, wire_dtype, transport ("grpc" or "handle"),
    micro_batches (2 = ping-pong overlap of attention and expert calls), shared_memory (same-node
    sessions: "auto" = CUDA IPC from a GPU router, /dev/shm from a CPU one; "shm", "cuda_ipc"; "" = every
    tensor as bytes over gRPC); security (docs/reliability.md):
    auth_token_file, require_tls, expert_tls {ca, cert, key, client_cert, client_key, server_name};
    limits: max_request_bytes, router_wait_s."""
    model = args["model"]
    cfg = MoEConfig.from_dir(model)
    directory = args.get("directory", DEFAULT_NAME)
    shards = shard_plan(cfg, args.get("layers_per_shard"))
    expert_tls = args.get("expert_tls")
    experts = [ExpertReplica.options(name=name).bind(model, name, pairs, directory, args.get("expert_dtype", "float32"),
                                                     tls=expert_tls)
               for name, pairs in shards.items()]
    router = Router.bind(model, shards, directory, experts=experts,
                         max_running=args.get("max_running", 64), max_queued=args.get("max_queued", 256),
                         expert_timeout_s=args.get("expert_timeout_s", 30.0), wire_dtype=args.get("wire_dtype"),
                         transport=args.get("transport", "grpc"), micro_batches=args.get("micro_batches", 1),
                         shared_memory=args.get("shared_memory", "auto"), expert_tls=expert_tls,
                         router_device=args.get("router_device", "auto"),
                         router_dtype=args.get("router_dtype", "float32"))
    gateway_args = {k: args[k] for k in ("max_request_bytes", "router_wait_s", "auth_token_file", "require_tls")
                    if args.get(k) is not None}
    return Gateway.bind(router, model, args.get("request_timeout_s", 300.0), **gateway_args)
