"""The Serve application: expert deployments, the router, the gateway (gRPC, and the OpenAI HTTP
routes on Serve's HTTP port: openai_api), composed with .bind().

The expert deployments come from the checkpoint: one per shard of `moe_core.shards.shard_plan` (expert e of every
layer, or of `layers_per_shard` layers). `args.expert_options` holds the Serve options every expert
deployment starts from (autoscaling, ray_actor_options, ...); the config's `deployments:` section
edits any deployment by name on top (`serve.yaml`, the package's default config, shows both).
"""
from __future__ import annotations

import copy

from ray import serve

from expert_service.deployment import ExpertReplica
from expert_service.directory import DEFAULT_NAME
from moe_core.config import MoEConfig
from moe_core.shards import shard_plan
from router_service.gateway import Gateway
from router_service.router import Router
from router_service.serving import ServingConfig


def build_app(args: dict) -> serve.Application:
    """`args`: the serving config (router_service/serving.py; router_service/serve.yaml documents
    each key), refused with the key named if it has one no section knows."""
    cfg = ServingConfig.from_args(args)
    model_cfg = MoEConfig.from_dir(cfg.model)
    shards = shard_plan(model_cfg.n_layers, model_cfg.n_experts, cfg.expert.layers_per_shard)
    directory = cfg.directory or DEFAULT_NAME
    options = cfg.expert.expert_options or {}
    experts = [ExpertReplica.options(name=name, **options).bind(cfg.model, name, pairs, directory,
                                                                 cfg.expert.expert_dtype, tls=cfg.expert_tls)
               for name, pairs in shards.items()]
    router = Router.bind(cfg.model, shards, cfg.router, directory, experts=experts, expert_tls=cfg.expert_tls,
                         deploy_id=cfg.deploy_id)
    return Gateway.bind(router, cfg.model, **cfg.gateway.given())


FIXED = ("Gateway", "Router")


def expert_deployments(app: dict, cfg: MoEConfig, source: str) -> list[dict]:
    """The `deployments:` list of one application of a Serve config with an entry for every expert
    shard the checkpoint has: `args.expert_options`, then the config's own entry of that name on
    top. Refuses (ValueError, one line naming both sides) a config that names a deployment the
    checkpoint does not have, or that lists some expert deployments, gives no `expert_options`,
    and misses others."""
    shards = list(shard_plan(cfg.n_layers, cfg.n_experts, app.get("args", {}).get("layers_per_shard")))
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
