"""Replica planning for hot experts, in the spirit of DeepSeek's EPLB: from observed per-(layer,
expert) load, how many replicas each expert shard (deployment) should get within a budget of
replicas (GPUs), and the load imbalance predicted before and after.

Pure functions over plain lists and dicts; `moe-serve plan` and the autoscaling policy call them.

Model: a shard's replicas share its rows evenly. In layer L, expert e's replicas each carry
`load[L][e] / replicas(shard of (L, e))`; the layer waits for the busiest of them. The layer's
imbalance is that maximum over the mean load per replica serving the layer
(`sum_e load[L][e] / sum_e replicas(shard of (L, e))`); 1.0 is perfect balance.
"""
from __future__ import annotations

import heapq

from moe_core.shards import shard_plan


def check_counts(counts) -> list[list[float]]:
    rows = [list(map(float, r)) for r in counts]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("load counts must be a non-empty [layers][experts] table")
    if any(v < 0 for r in rows for v in r):
        raise ValueError("load counts must not be negative")
    return rows


def shard_loads(counts, shards: dict[str, list[tuple[int, int]]]) -> dict[str, float]:
    return {name: float(sum(counts[L][e] for L, e in pairs)) for name, pairs in shards.items()}


def assign_replicas(loads: dict[str, float], budget: int, *, min_replicas: int = 1,
                    max_replicas: int | None = None) -> dict[str, int]:
    """Every shard gets `min_replicas`; each further replica goes to the shard whose load per
    replica is highest now (greedy water-filling: it minimises the largest load per replica).
    Replicas that would only split zero load are not handed out."""
    if min_replicas < 1:
        raise ValueError("every shard needs at least one replica")
    if max_replicas is not None and max_replicas < min_replicas:
        raise ValueError(f"max replicas ({max_replicas}) is below min replicas ({min_replicas})")
    need = min_replicas * len(loads)
    if budget < need:
        raise ValueError(f"a budget of {budget} replicas cannot give {len(loads)} shards "
                         f"{min_replicas} each ({need} needed)")
    replicas = {name: min_replicas for name in loads}
    heap = [(-load / min_replicas, name) for name, load in loads.items() if load > 0]
    heapq.heapify(heap)
    left = budget - need
    while left and heap:
        _, name = heapq.heappop(heap)
        if max_replicas is not None and replicas[name] >= max_replicas:
            continue
        replicas[name] += 1
        left -= 1
        heapq.heappush(heap, (-loads[name] / replicas[name], name))
    return replicas


def _layer_peaks(counts, shards, replicas) -> list[tuple[float, float]]:
    """(busiest replica's load, mean load per replica) in every layer."""
    of = {pair: name for name, pairs in shards.items() for pair in pairs}
    out = []
    for L, row in enumerate(counts):
        per = [(load, replicas[of[(L, e)]]) for e, load in enumerate(row) if (L, e) in of]
        total, units = sum(load for load, _ in per), sum(r for _, r in per)
        out.append((max(load / r for load, r in per), total / units) if total > 0 else (0.0, 0.0))
    return out


def imbalance(counts, shards: dict[str, list[tuple[int, int]]], replicas: dict[str, int]) -> list[float]:
    """max/mean load per replica in every layer (1.0 for a layer with no load)."""
    return [peak / mean if mean else 1.0 for peak, mean in _layer_peaks(counts, shards, replicas)]


def plan(counts, budget: int, shards: dict[str, list[tuple[int, int]]] | None = None, *,
         current: dict[str, int] | None = None, min_replicas: int = 1, max_replicas: int | None = None) -> dict:
    """The plan as JSON-ready data: replicas per shard, loads, and imbalance per layer before
    (`current` replicas, or one each) and after. `overall` is the sum over layers of the busiest
    replica's load over the sum of the means: the predicted slowdown of a step against a perfect split."""
    counts = check_counts(counts)
    shards = shards or shard_plan(len(counts), len(counts[0]))
    for name, pairs in shards.items():
        for L, e in pairs:
            if not (0 <= L < len(counts) and 0 <= e < len(counts[0])):
                raise ValueError(f"shard {name} names layer {L} expert {e}, outside the counts table")
    loads = shard_loads(counts, shards)
    before = {name: (current or {}).get(name) or 1 for name in shards}
    after = assign_replicas(loads, budget, min_replicas=min_replicas, max_replicas=max_replicas)
    return {"budget": budget, "replicas": after, "current": before, "load": loads,
            "imbalance_before": imbalance(counts, shards, before),
            "imbalance_after": imbalance(counts, shards, after),
            "overall_before": _overall(counts, shards, before),
            "overall_after": _overall(counts, shards, after)}


def _overall(counts, shards, replicas) -> float:
    peaks = _layer_peaks(counts, shards, replicas)
    mean = sum(m for _, m in peaks)
    return sum(p for p, _ in peaks) / mean if mean else 1.0
