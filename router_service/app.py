"""The Serve application: expert deployments, the router, the gateway (gRPC, and the OpenAI HTTP
routes on Serve's HTTP port: openai_api), composed with .bind().

The expert deployments come from the checkpoint: one per shard of `shard_plan` (expert e of every
layer, or of `layers_per_shard` layers). `args.expert_options` holds the Serve options every expert
deployment starts from (autoscaling, ray_actor_options, ...); the config's `deployments:` section
edits any deployment by name on top (`serve.yaml`, the package's default config, shows both).
"""
from __future__ import annotations

import copy

from ray import serve

from expert_service.deployment import ExpertReplica, shard_plan
from expert_service.directory import DEFAULT_NAME
from moe_core.config import MoEConfig
from router_service.openai_api import Gateway
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
    limits: max_request_bytes, router_wait_s; expert_wait_s (how long a step waits for an expert
    with no live replica to get one back); expert_options (Serve options of every expert
    deployment); deploy_id (reported by Stats: `moe-serve up` waits until it answers); the engine's
    max_seq_len, kv_tokens, kv_memory_fraction, max_step_tokens, cuda_graphs (see `Engine`)."""
    model = args["model"]
    cfg = MoEConfig.from_dir(model)
    directory = args.get("directory", DEFAULT_NAME)
    shards = shard_plan(cfg, args.get("layers_per_shard"))
    expert_tls = args.get("expert_tls")
    options = args.get("expert_options") or {}
    experts = [ExpertReplica.options(name=name, **options).bind(model, name, pairs, directory, args.get("expert_dtype", "float32"),
                                                     tls=expert_tls)
               for name, pairs in shards.items()]
    router = Router.bind(model, shards, directory, experts=experts,
                         max_running=args.get("max_running", 64), max_queued=args.get("max_queued", 256),
                         expert_timeout_s=args.get("expert_timeout_s", 30.0), wire_dtype=args.get("wire_dtype"),
                         transport=args.get("transport", "grpc"), micro_batches=args.get("micro_batches", 1),
                         shared_memory=args.get("shared_memory", "auto"), expert_tls=expert_tls,
                         router_device=args.get("router_device", "auto"),
                         router_dtype=args.get("router_dtype", "float32"),
                         expert_wait_s=args.get("expert_wait_s", 30.0), deploy_id=args.get("deploy_id", ""),
                         **{k: args[k] for k in ENGINE_ARGS if args.get(k) is not None})
    gateway_args = {k: args[k] for k in ("max_request_bytes", "router_wait_s", "auth_token_file", "require_tls")
                    if args.get(k) is not None}
    return Gateway.bind(router, model, args.get("request_timeout_s", 300.0), **gateway_args)


FIXED = ("Gateway", "Router")
ENGINE_ARGS = ("max_seq_len", "kv_tokens", "kv_memory_fraction", "max_step_tokens", "cuda_graphs")


def expert_deployments(app: dict, cfg: MoEConfig, source: str) -> list[dict]:
    """The `deployments:` list of one application of a Serve config with an entry for every expert
    shard the checkpoint has: `args.expert_options`, then the config's own entry of that name on
    top. Refuses (ValueError, one line naming both sides) a config that names a deployment the
    checkpoint does not have, or that lists some expert deployments, gives no `expert_options`,
    and misses others."""
    shards = list(shard_plan(cfg, app.get("args", {}).get("layers_per_shard")))
    listed = {d["name"]: d for d in app.get("deployments") or []}
    model = app.get("args", {}).get("model")
    about = f"checkpoint {model} ({cfg.n_experts} experts, {cfg.n_layers} layers)"
    unknown = [n for n in listed if n not in FIXED and n not in shards]
    if unknown:
        raise ValueError(f"{source} configures deployment {', '.join(unknown)}, which {about} does not have; "
                         f"its expert deployments are {_names(shards)}")
    options = app.get("args", {}).get("expert_options")
    missing = [n for n in shards if n not in listed]
    if options is None and missing and len(missing) < len(shards):
        raise ValueError(f"{source} configures some expert deployments but not {', '.join(missing)}, which "
                         f"{about} needs; add them, or give args.expert_options for every expert deployment")
    out = [listed[n] for n in FIXED if n in listed]
    for name in shards:
        own = listed.get(name, {})
        entry = copy.deepcopy(options or {})
        # a fixed count of its own replaces the default's autoscaling, and the other way round
        entry.pop("autoscaling_config" if "num_replicas" in own else "num_replicas" if "autoscaling_config" in own
                  else "", None)
        out.append(_merge(entry, own) | {"name": name})
    return out


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key (an expert's own `autoscaling_config:
    {max_replicas: 8}` keeps the default's policy)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _names(shards: list[str]) -> str:
    return f"{shards[0]} .. {shards[-1]}" if len(shards) > 2 else ", ".join(shards)
