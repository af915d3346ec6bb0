"""The replicas of every expert shard and the calls to them, whatever the channel.

`lookup()` returns {shard: [address, ...]} (the directory's table); `connect(shard, address)`
makes the Channel to one replica (router_service/channels). A call goes to the replica with the
fewest outstanding calls. A call that fails because its replica is gone (UNAVAILABLE, CANCELLED)
is retried on another replica of the shard within the deadline, and the dead address is reported
(`forget`) so the directory drops it. A shard with no live replica left (its only one restarting)
holds the call until one registers again, up to `wait_s` and the deadline: every token of the
step needs that expert, so waiting loses nothing that failing would keep. A shard with several
live replicas gets a large call's rows split among them (data parallel), so a hot expert's extra
replicas shorten the layer step, not only absorb other routers' calls.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import grpc
import torch

from router_service.channels import Channel

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class ExpertsUnavailable(RuntimeError):
    """No live replica of a shard answered within the deadline; the gateway answers UNAVAILABLE."""


def split_segments(segments, k: int) -> list[tuple[int, int, list]]:
    """Rows of (layer, expert, rows) segments cut into k contiguous parts of about equal size:
    [(start, stop, segments of that part)]; a segment may be cut in two."""
    ends = list(itertools.accumulate(n for _, _, n in segments))
    spans = [(end - n, end, L, E) for (L, E, n), end in zip(segments, ends)]
    bounds = [ends[-1] * i // k for i in range(k + 1)] if ends else [0] * (k + 1)
    return [(a, b, [(L, E, min(b, stop) - max(a, start)) for start, stop, L, E in spans if start < b and stop > a])
            for a, b in zip(bounds, bounds[1:])]


@dataclass
class _Replica:
    address: str
    channel: Channel
    outstanding: int = 0
    dead_until: float = 0.0


class ReplicaPool:
    def __init__(self, lookup, connect, forget=None, *, call_timeout_s: float = 30.0, refresh_s: float = 1.0,
                 split_min_rows: int = 32, wait_s: float = 30.0, wait_poll_s: float = 0.25):
        self.lookup, self.connect, self.forget = lookup, connect, forget
        self.call_timeout_s, self.refresh_s = call_timeout_s, refresh_s
        self.split_min_rows = split_min_rows  # below this many rows per replica, one call is cheaper
        self.wait_s, self.wait_poll_s = wait_s, wait_poll_s
        self.replicas: dict[str, list[_Replica]] = {}
        self._channels: dict[tuple[str, str], Channel] = {}
        self._refreshed = 0.0
        self._refreshing: asyncio.Lock | None = None
        self.calls = 0
        self.retries = 0
        self.waits = 0  # calls that found no live replica and waited for one
        self.bytes_out = 0  # tensor payload bytes sent to / received from experts
        self.bytes_in = 0
        self.latencies: deque[tuple[str, float]] = deque(maxlen=1 << 16)  # (shard, s); metrics drain it

    async def refresh(self, force: bool = False) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not force and time.monotonic() - self._refreshed < self.refresh_s:
                return
            table = await self.lookup()
            self._refreshed = time.monotonic()
            old = {(shard, r.address): r for shard, rs in self.replicas.items() for r in rs}
            self.replicas = {shard: [old.get((shard, a)) or _Replica(a, self._channel(shard, a)) for a in addresses]
                             for shard, addresses in table.items()}
            live = {(shard, a) for shard, addresses in table.items() for a in addresses}
            for key in [k for k in self._channels if k not in live]:
                await self._channels.pop(key).close()

    def _channel(self, shard: str, address: str) -> Channel:
        if (shard, address) not in self._channels:
            self._channels[shard, address] = self.connect(shard, address)
        return self._channels[shard, address]

    def _pick(self, shard: str) -> _Replica | None:
        now = time.monotonic()
        live = [r for r in self.replicas.get(shard, []) if r.dead_until <= now]
        if not live:
            return None
        least = min(r.outstanding for r in live)
        return random.choice([r for r in live if r.outstanding == least])

    async def call(self, shard: str, x_nH: torch.Tensor, segments, out_nH: torch.Tensor,
                   deadline: float | None = None) -> None:
        """The shard's experts on x_nH's rows by (layer, expert, rows) segments, into out_nH, by
        `deadline` (time.monotonic(); None: call_timeout_s from now)."""
        if time.monotonic() - self._refreshed >= self.refresh_s:
            await self.refresh()
        deadline = deadline or time.monotonic() + self.call_timeout_s
        now = time.monotonic()
        k = min(sum(r.dead_until <= now for r in self.replicas.get(shard, [])), x_nH.shape[0] // self.split_min_rows)
        if k < 2:
            await self._call_one(shard, x_nH, segments, out_nH, deadline)
            return
        await asyncio.gather(*(self._call_one(shard, x_nH[a:b], segs, out_nH[a:b], deadline)
                               for a, b, segs in split_segments(segments, k)))

    async def _call_one(self, shard: str, x_nH: torch.Tensor, segments, out_nH: torch.Tensor, deadline: float) -> None:
        last_error, waiting_since = None, None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            replica = self._pick(shard)
            if replica is None:
                await self.refresh(force=True)
                replica = self._pick(shard)
            if replica is None:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    self.waits += 1
                    log.warning("expert shard %s has no live replica; waiting up to %.0f s for one", shard,
                                min(self.wait_s, remaining))
                if time.monotonic() - waiting_since >= self.wait_s:
                    break
                await asyncio.sleep(min(self.wait_poll_s, remaining))
                continue
            replica.outstanding += 1
            self.calls += 1
            try:
                started = time.perf_counter()
                await replica.channel.forward(x_nH, segments, timeout=min(remaining, self.call_timeout_s), out=out_nH)
                self.latencies.append((shard, time.perf_counter() - started))
                nbytes = x_nH.numel() * (replica.channel.wire_itemsize or x_nH.element_size())
                self.bytes_out += nbytes
                self.bytes_in += nbytes  # the reply has the request's shape and wire dtype
                return
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
        waited = f" after waiting {time.monotonic() - waiting_since:.1f} s" if waiting_since is not None else ""
        raise ExpertsUnavailable(f"no live replica of expert shard {shard}{waited}{detail}")

    async def close(self) -> None:
        for c in self._channels.values():
            await c.close()
        self._channels.clear()
