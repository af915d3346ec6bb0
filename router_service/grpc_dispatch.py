"""The gRPC dispatcher: each layer's rows go to the expert replicas over ExpertService, concurrently.

Replica choice is fewest outstanding calls. A call that fails because its replica is gone
(UNAVAILABLE) is retried on another replica of the same shard within the step's deadline, and the
dead address is reported so the directory forgets it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc
import torch

from expert_service.client import ExpertClient
from router_service.dispatch import STEP_DEADLINE, gather_rows, scatter_rows, split_by_shard

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class ExpertsUnavailable(RuntimeError):
    """No live replica of a shard answered within the deadline; the gateway answers UNAVAILABLE."""


@dataclass
class _Replica:
    address: str
    client: ExpertClient
    outstanding: int = 0
    dead_until: float = 0.0


class GrpcDispatcher:
    """`lookup()` returns {shard: [address, ...]}; `forget(address)` reports a dead one."""

    def __init__(self, shard_of: dict[tuple[int, int], str], lookup, forget=None, *,
                 call_timeout_s: float = 30.0, refresh_s: float = 1.0, wire_dtype: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.shard_of, self.lookup, self.forget = shard_of, lookup, forget
        self.call_timeout_s, self.refresh_s, self.wire_dtype = call_timeout_s, refresh_s, wire_dtype
        self.credentials = credentials
        self.replicas: dict[str, list[_Replica]] = {}
        self._clients: dict[str, ExpertClient] = {}
        self._refreshed = 0.0
        self._refreshing: asyncio.Lock | None = None
        self.calls = 0
        self.retries = 0
        self.bytes_out = 0
        self.bytes_in = 0

    async def refresh(self, force: bool = False) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not force and time.monotonic() - self._refreshed < self.refresh_s:
                return
            table = await self.lookup()
            self._refreshed = time.monotonic()
            old = {r.address: r for rs in self.replicas.values() for r in rs}
            self.replicas = {}
            for shard, addresses in table.items():
                self.replicas[shard] = [old.get(a) or _Replica(a, self._client(a)) for a in addresses]
            live = {a for addresses in table.values() for a in addresses}
            for a in [a for a in self._clients if a not in live]:
                await self._clients.pop(a).close()

    def _client(self, address: str) -> ExpertClient:
        if address not in self._clients:
            self._clients[address] = ExpertClient(address, credentials=self.credentials)
        return self._clients[address]

    def _pick(self, shard: str) -> _Replica | None:
        now = time.monotonic()
        live = [r for r in self.replicas.get(shard, []) if r.dead_until <= now]
        if not live:
            return None
        least = min(r.outstanding for r in live)
        return random.choice([r for r in live if r.outstanding == least])

    async def run_experts(self, layer: int, x_NH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        if time.monotonic() - self._refreshed >= self.refresh_s:
            await self.refresh()
        y_NH = torch.empty_like(x_NH)
        plan = split_by_shard(layer, counts_E, self.shard_of)
        outs = await asyncio.gather(*(self._call(shard, gather_rows(x_NH, ranges), segs)
                                      for shard, ranges, segs in plan))
        for (_, ranges, _), out in zip(plan, outs):
            scatter_rows(y_NH, ranges, out)
        return y_NH

    async def _call(self, shard: str, x_nH: torch.Tensor, segments) -> torch.Tensor:
        deadline = STEP_DEADLINE.get() or time.monotonic() + self.call_timeout_s
        last_error = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            replica = self._pick(shard)
            if replica is None:
                await self.refresh(force=True)
                replica = self._pick(shard)
                if replica is None:  # fail fast: waiting would hold every request in the step
                    break
            replica.outstanding += 1
            self.calls += 1
            try:
                return await replica.client.forward(x_nH, segments, timeout=min(remaining, self.call_timeout_s),
                                                    wire_dtype=self.wire_dtype)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"expert shard {shard} did not answer within the deadline") from None
                if e.code() not in RETRYABLE:
                    raise
                last_error = e
                self.retries += 1
                replica.dead_until = time.monotonic() + 2 * self.refresh_s
                log.warning("expert replica %s of %s failed (%s); retrying", replica.address, shard, e.code())
                if self.forget is not None:
                    await self.forget(replica.address)
            finally:
                replica.outstanding -= 1
        detail = f" (last error: {last_error.details()})" if last_error is not None else ""
        raise ExpertsUnavailable(f"no live replica of expert shard {shard}{detail}")

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
