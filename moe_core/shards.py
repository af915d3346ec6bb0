"""Expert deployments: the one rule that names them and says which (layer, expert) pairs each
serves. The app deploys by it, and the planner, the simulator and the load generator read it.

    expert-{e}                expert e of every layer (the default)
    expert-{e}-layers-{a}-{b} expert e of layers a..b (with layers_per_shard)
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^expert-(\d+)(?:-layers-(\d+)-(\d+))?$")


def shard_name(expert: int, layers: tuple[int, int] | None = None) -> str:
    return f"expert-{expert}" if layers is None else f"expert-{expert}-layers-{layers[0]}-{layers[1]}"


def shard_plan(n_layers: int, n_experts: int, layers_per_shard: int | None = None) -> dict[str, list[tuple[int, int]]]:
    """Deployment name -> (layer, expert) pairs: expert e across all layers, or across
    `layers_per_shard` layers at a time."""
    if not layers_per_shard or layers_per_shard >= n_layers:
        return {shard_name(e): [(L, e) for L in range(n_layers)] for e in range(n_experts)}
    plan = {}
    for e in range(n_experts):
        for a in range(0, n_layers, layers_per_shard):
            b = min(a + layers_per_shard, n_layers) - 1
            plan[shard_name(e, (a, b))] = [(L, e) for L in range(a, b + 1)]
    return plan


def shards_from_names(names, n_layers: int) -> dict[str, list[tuple[int, int]]]:
    """Deployment names as `shard_plan` makes them -> their pairs; ValueError for any other name."""
    shards = {}
    for name in names:
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"cannot tell which experts deployment {name!r} serves "
                             "(expected expert-E or expert-E-layers-A-B)")
        e = int(m.group(1))
        a, b = (int(m.group(2)), int(m.group(3))) if m.group(2) else (0, n_layers - 1)
        shards[name] = [(L, e) for L in range(a, b + 1)]
    return shards
