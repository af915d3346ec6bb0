"""The transport seam between the router's MoE block and the experts.

A dispatcher takes one layer's routed rows, already grouped by expert (`counts_E[e]` rows for
expert e, in expert order), and returns the experts' unweighted outputs in the same row order:

    async def run_experts(layer, x_NH, counts_E) -> y_NH

This module holds the in-process one (reference and tests) and the shard bookkeeping shared by
the remote ones (gRPC in `grpc_dispatch`, Serve handles in `handle_dispatch`).
"""
from __future__ import annotations

import contextvars

import torch

from expert_service.experts import ExpertShard


# time.monotonic() by which the current engine step must finish; remote calls get what is left.
STEP_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("step_deadline", default=None)


class InProcessDispatcher:
    def __init__(self, shard: ExpertShard):
        self.shard = shard

    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        return self.shard.forward(x_NH, [(layer, e, n) for e, n in enumerate(counts_E)])

    def on_device(self, n_layers: int, n_experts: int):
        """`experts(layer, x_NH, counts_E)` with the counts a device tensor (no host wait, so a CUDA
        graph can hold the whole step), or None where the shard cannot run them that way."""
        if all(self.shard.can_group(L, n_experts) for L in range(n_layers)):
            return self.shard.grouped
        return None


def split_by_shard(layer: int, counts_E: list[int], shard_of: dict[tuple[int, int], str]):
    """Yields (shard, row_ranges, segments) for every shard that gets rows in this layer.

    row_ranges are (start, stop) slices of x_NH, adjacent ones merged (a shard holding every
    expert gets x_NH itself, no copy); segments are (layer, expert, rows) for the wire.
    """
    offsets = [0]
    for n in counts_E:
        offsets.append(offsets[-1] + n)
    plan: dict[str, tuple[list, list]] = {}
    for e, n in enumerate(counts_E):
        if n:
            ranges, segs = plan.setdefault(shard_of[(layer, e)], ([], []))
            if ranges and ranges[-1][1] == offsets[e]:  # back to back with the last: one range
                ranges[-1] = (ranges[-1][0], offsets[e + 1])
            else:
                ranges.append((offsets[e], offsets[e + 1]))
            segs.append((layer, e, n))
    return [(shard, ranges, segs) for shard, (ranges, segs) in plan.items()]


def gather_rows(x_NH: torch.Tensor, ranges) -> torch.Tensor:
    if len(ranges) == 1:
        a, b = ranges[0]
        return x_NH[a:b]
    return torch.cat([x_NH[a:b] for a, b in ranges])


def scatter_rows(y_NH: torch.Tensor, ranges, out_nH: torch.Tensor) -> None:
    row = 0
    for a, b in ranges:
        y_NH[a:b] = out_nH[row:row + b - a]
        row += b - a
