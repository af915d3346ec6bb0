"""The router's Prometheus metrics, through Ray's metrics API (`ray.util.metrics`): Ray's metrics
agent on each node serves them with every other Ray and Serve metric (names get Ray's `ray_`
prefix there; counters also a `_total` suffix).

    moe_tokens_routed{layer, expert}        counter    token rows the gate sent to each (layer, expert)
    moe_expert_calls{shard}                 counter    ExpertService.Forward calls that succeeded
    moe_expert_call_latency_s{shard}        histogram  one call's latency seen by the router (sampled)
    moe_expert_bytes{direction}             counter    hidden-state bytes scattered to / gathered from experts
                                                       (over gRPC or through shared buffers alike)
    moe_channel_fallbacks{reason}           counter    same-node session calls sent as bytes instead
    moe_layer_load_imbalance{layer}         gauge      max/mean tokens per expert over the last window
    moe_router_queue_depth{state}           gauge      sequences queued (waiting) / running

Nothing is recorded on the per-layer path: the engine keeps its routing counts (RouteStats) and
the replica pool its byte counters and a bounded buffer of call latencies; a task on the
router's event loop turns their changes into metric records once per `interval_s`: a Ray metric
record costs microseconds, and one per layer and expert would add up to a large share of a step.
The latency histogram gets a uniform sample of at most `latency_samples` calls per flush
(recording every call of a busy second would take milliseconds); a uniform sample keeps the
distribution, and `moe_expert_calls` counts every call. On the per-call path the pool only appends
(shard, seconds) to a deque.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque

import numpy as np

from router_service.channels import FALLBACKS

LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def layer_imbalance(counts_LE: np.ndarray) -> list[float | None]:
    """max/mean over the experts of each layer; None for a layer without tokens."""
    mean = counts_LE.mean(axis=1)
    return [float(m / a) if a > 0 else None for m, a in zip(counts_LE.max(axis=1), mean)]


class RouterMetrics:
    def __init__(self, engine, *, interval_s: float = 1.0, window_s: float = 10.0, latency_samples: int = 128):
        from ray.util import metrics as m

        self.engine, self.interval_s, self.window_s = engine, interval_s, window_s
        self.latency_samples = latency_samples
        self.calls = m.Counter("moe_expert_calls", "ExpertService.Forward calls that succeeded", tag_keys=("shard",))
        self.routed = m.Counter("moe_tokens_routed", "Token rows routed to each (layer, expert)",
                                tag_keys=("layer", "expert"))
        self.latency = m.Histogram("moe_expert_call_latency_s", "ExpertService.Forward call latency (router side)",
                                   boundaries=LATENCY_BOUNDARIES_S, tag_keys=("shard",))
        self.bytes = m.Counter("moe_expert_bytes", "Tensor payload bytes scattered to and gathered from experts",
                               tag_keys=("direction",))
        self.fallbacks = m.Counter("moe_channel_fallbacks", "Same-node session calls sent as bytes, by reason",
                                   tag_keys=("reason",))
        self.imbalance = m.Gauge("moe_layer_load_imbalance", "max/mean tokens per expert, recent window",
                                 tag_keys=("layer",))
        self.queue = m.Gauge("moe_router_queue_depth", "Sequences waiting or running in the router",
                             tag_keys=("state",))
        self._counts = engine.stats.counts.copy()
        self._bytes = {"scattered": 0, "gathered": 0}
        self._fallbacks = dict(FALLBACKS)
        self._recent: deque[tuple[float, np.ndarray]] = deque()  # (time, counts delta) within window_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the flushing task on the running loop; cheap to call again (every request does)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        while True:
            await asyncio.sleep(self.interval_s)
            self.flush()

    def collect(self, now: float | None = None) -> dict:
        """What changed since the last collect, as plain data (the records `flush` makes)."""
        now = time.monotonic() if now is None else now
        counts = self.engine.stats.counts.copy()
        delta = counts - self._counts
        self._counts = counts
        if delta.any():
            self._recent.append((now, delta))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        window = sum((d for _, d in self._recent), np.zeros_like(counts))
        pool = getattr(self.engine.dispatcher, "pool", None)  # remote dispatchers only
        totals = {"scattered": getattr(pool, "bytes_out", 0), "gathered": getattr(pool, "bytes_in", 0)}
        nbytes = {k: v - self._bytes[k] for k, v in totals.items()}
        self._bytes = totals
        fallbacks = {k: v - self._fallbacks.get(k, 0) for k, v in FALLBACKS.items()}
        self._fallbacks = dict(FALLBACKS)
        latencies = getattr(pool, "latencies", None)
        drained = [latencies.popleft() for _ in range(len(latencies))] if latencies else []
        calls: dict[str, int] = {}
        for shard, _ in drained:
            calls[shard] = calls.get(shard, 0) + 1
        sample = drained if len(drained) <= self.latency_samples else random.sample(drained, self.latency_samples)
        return {"routed": delta, "bytes": nbytes, "fallbacks": fallbacks, "calls": calls, "latency_sample": sample,
                "imbalance": layer_imbalance(window) if self._recent else [],
                "queue": {"queued": len(self.engine.waiting), "running": len(self.engine.running)}}

    def flush(self) -> dict:
        c = self.collect()
        for (L, e), n in np.ndenumerate(c["routed"]):
            if n:
                self.routed.inc(int(n), tags={"layer": str(L), "expert": str(e)})
        for direction, n in c["bytes"].items():
            if n:
                self.bytes.inc(n, tags={"direction": direction})
        for reason, n in c["fallbacks"].items():
            if n:
                self.fallbacks.inc(n, tags={"reason": reason})
        for shard, n in c["calls"].items():
            self.calls.inc(n, tags={"shard": shard})
        for shard, seconds in c["latency_sample"]:
            self.latency.observe(seconds, tags={"shard": shard})
        for L, r in enumerate(c["imbalance"]):
            if r is not None:
                self.imbalance.set(r, tags={"layer": str(L)})
        for state, n in c["queue"].items():
            self.queue.set(n, tags={"state": state})
        return c
