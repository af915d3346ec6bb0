"""The Ray-native dispatcher: expert calls through Serve deployment handles (Ray's own transport
and serialization). The baseline the gRPC data plane is measured against; same numbers."""
from __future__ import annotations

import asyncio

import torch

from router_service.dispatch import gather_rows, scatter_rows, split_by_shard


class HandleDispatcher:
    def __init__(self, shard_of: dict[tuple[int, int], str], handles: dict):
        self.shard_of, self.handles = shard_of, handles

    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        y_NH = torch.empty_like(x_NH)
        plan = split_by_shard(layer, counts_E, self.shard_of)
        outs = await asyncio.gather(*(self.handles[shard].forward.remote(gather_rows(x_NH, ranges), segs)
                                      for shard, ranges, segs in plan))
        for (_, ranges, _), out in zip(plan, outs):
            scatter_rows(y_NH, ranges, out)
        return y_NH
