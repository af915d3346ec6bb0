"""Per-expert autoscaling: the load an expert replica reports to Serve, and the policy that turns
the reports of one expert deployment into its number of replicas.

Each replica reports, every `look_back_period_s / 5` seconds (Serve's record interval):

    rows_per_s       rows (token x expert assignments) it finished per second since the last report
    busy             seconds spent inside Forward per second: the time-averaged calls in flight
    calls_in_flight  Forward calls inside the replica at the moment of the report
    rows_in_flight   rows inside the replica at the moment of the report

The policy scales on `rows_per_s` by default (docs/autoscaling.md has the measurement behind the
choice): Serve averages each replica's reports over the look-back window, the policy sums them
over the deployment's replicas and asks for `ceil(load / target)` replicas. Serve's own wrapper
then applies min/max_replicas, upscale/downscale delays and the scaling factors. Going down waits
until the load fits the smaller count with room to spare (`downscale_margin`), so a load near a
boundary does not make replicas come and go.

Use it in a deployment's `autoscaling_config`:

    policy:
      policy_function: expert_service.autoscaling:ExpertLoadPolicy
      policy_kwargs: {target: 400, metric: rows_per_s}
"""
from __future__ import annotations

import json
import math
import os
import time

METRICS = ("rows_per_s", "busy", "calls_in_flight", "rows_in_flight")


class LoadMeter:
    """Turns an ExpertServicer's cumulative counters into the rates a replica reports."""

    def __init__(self, servicer, clock=time.monotonic):
        self.servicer, self.clock = servicer, clock
        self._t, self._rows, self._busy = clock(), servicer.rows, servicer.busy_s

    def sample(self) -> dict[str, float]:
        s, now = self.servicer, self.clock()
        dt = max(now - self._t, 1e-6)
        out = {"rows_per_s": (s.rows - self._rows) / dt, "busy": (s.busy_s - self._busy) / dt,
               "calls_in_flight": float(s.in_flight), "rows_in_flight": float(s.rows_in_flight)}
        self._t, self._rows, self._busy = now, s.rows, s.busy_s
        return out


def desired_replicas(load: float, target: float, current: int, downscale_margin: float = 0.8) -> int:
    """Replicas for `load` at `target` per replica; below `current` only when the load fits the
    smaller count at `downscale_margin` of the target."""
    up = max(1, math.ceil(load / target))
    if up >= current:
        return up
    return min(current, max(up, math.ceil(load / (target * downscale_margin))))


def planned_replicas(path: str) -> dict[str, int]:
    """Replicas per deployment in a `moe-serve plan --json` file."""
    with open(path) as f:
        plan = json.load(f)
    return {name: int(n) for name, n in plan["replicas"].items()}


class ExpertLoadPolicy:
    """A Serve autoscaling policy (class form: Serve builds it once per deployment with
    `policy_kwargs` and calls it every control-loop tick with an AutoscalingContext).

    `plan`: optional path (readable by the Serve controller) to a `moe-serve plan --json` file; the
    replicas it names for this deployment are a floor under the load-driven count.
    """

    def __init__(self, target: float = 400.0, metric: str = "rows_per_s", downscale_margin: float = 0.8,
                 plan: str | None = None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not 0 < downscale_margin <= 1:
            raise ValueError(f"downscale_margin must be in (0, 1], got {downscale_margin}")
        self.target, self.metric, self.downscale_margin, self.plan = target, metric, downscale_margin, plan
        self._plan_cache: tuple[float, dict[str, int]] | None = None  # (mtime, replicas per deployment)

    def __call__(self, ctx) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get(self.metric) or {}
        if not per_replica:  # no report yet (replicas starting): keep what Serve has decided
            return ctx.target_num_replicas, {}
        load = float(sum(per_replica.values()))
        desired = desired_replicas(load, self.target, ctx.target_num_replicas, self.downscale_margin)
        floor = self._planned(ctx.deployment_name)
        if floor is not None:
            desired = max(desired, floor)
        return desired, {"load": load, "desired": desired}

    def _planned(self, deployment: str) -> int | None:
        if not self.plan:
            return None
        try:
            mtime = os.stat(self.plan).st_mtime
            if self._plan_cache is None or self._plan_cache[0] != mtime:
                self._plan_cache = (mtime, planned_replicas(self.plan))
            return self._plan_cache[1].get(deployment)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # a missing or half-written plan must not stop autoscaling
            return None
