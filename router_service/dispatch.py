"""The seam between the router's MoE block and the experts: a Dispatcher.

A dispatcher takes one layer's routed rows, already grouped by expert (`counts_E[e]` rows for
expert e, in expert order), and returns the experts' unweighted outputs in the same row order,
by `deadline` (time.monotonic(); None for the dispatcher's own default), into `out_NH` when
given (a CUDA graph's static buffer, say: no tensor of its own, no copy):

    await dispatcher.run_experts(layer, x_NH, counts_E, deadline, out_NH=None) -> y_NH

Two: InProcessDispatcher (the reference: the experts in this process) and RemoteDispatcher
(the rows cut by shard and sent through a ReplicaPool, whose Channels move them).
"""
from __future__ import annotations

import asyncio
from typing import Protocol

import torch

from expert_service.experts import ExpertShard
from router_service.channels.by_name import connector
from router_service.replica_pool import ReplicaPool


class Dispatcher(Protocol):
    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int], deadline: float | None = None,
                          out_NH: torch.Tensor | None = None) -> torch.Tensor: ...


class InProcessDispatcher:
    def __init__(self, shard: ExpertShard):
        self.shard = shard

    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int], deadline: float | None = None,
                          out_NH: torch.Tensor | None = None) -> torch.Tensor:
        return self.shard.forward(x_NH, [(layer, e, n) for e, n in enumerate(counts_E)], out_TH=out_NH)

    def on_device(self, n_layers: int, n_experts: int):
        """`experts(layer, x_NH, counts_E)` with the counts a device tensor (no host wait, so a CUDA
        graph can hold the whole step), or None where the shard cannot run them that way."""
        if all(self.shard.can_group(L, n_experts) for L in range(n_layers)):
            return self.shard.grouped
        return None


class RemoteDispatcher:
    """Each layer's rows cut by shard (`shard_of[(layer, expert)]` names it) and sent to the
    shards' replicas through `pool`, concurrently."""

    def __init__(self, shard_of: dict[tuple[int, int], str], pool: ReplicaPool):
        self.shard_of, self.pool = shard_of, pool

    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int], deadline: float | None = None,
                          out_NH: torch.Tensor | None = None) -> torch.Tensor:
        y_NH = torch.empty_like(x_NH) if out_NH is None else out_NH
        calls = [self._shard_call(shard, x_NH, y_NH, ranges, segs, deadline)
                 for shard, ranges, segs in split_by_shard(layer, counts_E, self.shard_of)]
        await (calls[0] if len(calls) == 1 else asyncio.gather(*calls))  # one shard: no task to schedule
        return y_NH

    async def close(self) -> None:
        await self.pool.close()

    async def _shard_call(self, shard: str, x_NH: torch.Tensor, y_NH: torch.Tensor, ranges, segments, deadline) -> None:
        """A shard's rows: one slice of x_NH (each expert its own shard, or adjacent ones) goes as it
        is, and its output lands straight in y_NH's slice; scattered rows are gathered and scattered."""
        if len(ranges) == 1:
            a, b = ranges[0]
            await self.pool.call(shard, x_NH[a:b], segments, y_NH[a:b], deadline)
            return
        x_nH = gather_rows(x_NH, ranges)
        await self.pool.call(shard, x_nH, segments, out := torch.empty_like(x_nH), deadline)
        scatter_rows(y_NH, ranges, out)


def remote_dispatcher(shard_of: dict[tuple[int, int], str], lookup, forget=None, *, channel: str = "grpc",
                      handles: dict | None = None, local_hosts: frozenset[str] | None = None, credentials=None,
                      channel_options=(), wire_dtype: str | None = None, **pool_options) -> RemoteDispatcher:
    """A RemoteDispatcher whose pool reaches replicas over `channel` (the channel arguments are
    router_service.channels.by_name.connector's; the rest the ReplicaPool's)."""
    connect = connector(channel, handles=handles, local_hosts=local_hosts, credentials=credentials,
                        channel_options=channel_options, wire_dtype=wire_dtype)
    return RemoteDispatcher(shard_of, ReplicaPool(lookup, connect, forget, **pool_options))


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
    return torch.cat([x_NH[a:b] for a, b in ranges])


def scatter_rows(y_NH: torch.Tensor, ranges, out_nH: torch.Tensor) -> None:
    row = 0
    for a, b in ranges:
        y_NH[a:b] = out_nH[row:row + b - a]
        row += b - a
