"""`moe-serve plan`: replicas per expert deployment within a budget, from a running gateway's
routing counts (`--address`) or from a saved `moe-serve stats` JSON (`--counts`)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    from moe_serve.cli import address
    s = sub.add_parser("plan", help="replicas per expert deployment for a replica (GPU) budget, "
                                    "from observed routing (EPLB-style)")
    s.add_argument("--budget", type=int, required=True, help="expert replicas (GPUs) in all")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--address", type=address, default="127.0.0.1:9000", help="gateway HOST[:PORT] to read counts from")
    src.add_argument("--counts", help="JSON file: `moe-serve stats` output, or a [layers][experts] list")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, help="cap per deployment")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--json", action="store_true", help="print JSON (the autoscaling policy's `plan` input)")
    s.set_defaults(fn=cmd_plan)


def cmd_plan(a) -> None:
    from moe_serve.planner import plan
    counts, shards, current = _from_file(a.counts) if a.counts else _from_gateway(a.address, a.timeout)
    result = plan(counts, a.budget, shards, current=current, min_replicas=a.min_replicas,
                  max_replicas=a.max_replicas)
    print(json.dumps(result) if a.json else table(result))


def _from_gateway(address: str, timeout: float):
    from moe_serve.client import stats
    r = stats(address, timeout=timeout)
    counts = [list(layer.tokens_per_expert) for layer in r.layers]
    shards = {d.name: [(k.layer, k.expert) for k in d.serves] for d in r.deployments}
    return counts, shards or None, {d.name: d.replicas for d in r.deployments}


def _from_file(path: str):
    from moe_core.shards import shards_from_names
    from moe_serve.planner import check_counts
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if isinstance(data, list):
        return data, None, None
    if not isinstance(data, dict) or "tokens_per_expert" not in data:
        raise ValueError(f"{path}: expected `moe-serve stats` JSON (with tokens_per_expert) "
                         "or a [layers][experts] list")
    counts = check_counts(data["tokens_per_expert"])
    replicas = data.get("replicas") or {}
    shards = shards_from_names(replicas, len(counts)) if replicas else None
    return counts, shards, replicas or None


def table(p: dict) -> str:
    total = sum(p["load"].values()) or 1.0
    lines = [f"{'deployment':<22}{'load':>12}{'share':>8}{'now':>6}{'planned':>9}{'load/replica':>14}"]
    for name, n in p["replicas"].items():
        load = p["load"][name]
        lines.append(f"{name:<22}{load:>12.0f}{load / total:>8.1%}{p['current'][name]:>6}{n:>9}{load / n:>14.0f}")
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines += [f"budget {p['budget']}: {sum(p['replicas'].values())} replicas planned",
              f"imbalance max/mean per layer, now:     {fmt(p['imbalance_before'])}  (step {p['overall_before']:.2f})",
              f"imbalance max/mean per layer, planned: {fmt(p['imbalance_after'])}  (step {p['overall_after']:.2f})"]
    return "\n".join(lines)
