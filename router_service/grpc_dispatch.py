"""The gRPC dispatcher: each layer's rows go to the expert replicas over ExpertService, concurrently.

Replica choice is fewest outstanding calls. A call that fails because its replica is gone
(UNAVAILABLE) is retried on another replica of the same shard within the step's deadline, and the
dead address is reported so the directory forgets it. A shard with no live replica left (its only
one restarting) holds the call until one registers again, up to `wait_s` and the deadline: every
token of the step needs that expert, so waiting loses nothing that failing would keep.
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

from expert_service.client import ExpertClient
from expert_service.server import CHANNEL_OPTIONS
from moe_core.codec import DTYPES, keep_large_buffers
from router_service.dispatch import STEP_DEADLINE, gather_rows, scatter_rows, split_by_shard

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

# A replica whose process dies closes its sockets and calls fail at once; one whose node vanishes
# (or that stops reading) would hold a call until its deadline. These bound that: a connection
# attempt gives up after 2 s (gRPC's default is 20 s), and a connection with calls in flight that
# stops answering keepalive pings is closed after 10 + 5 s; either way the call fails UNAVAILABLE
# and is retried on another replica. Pings go only while calls are in flight and at most two
# without data, within what servers accept by default.
EXPERT_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


def split_segments(segments, k: int) -> list[tuple[int, int, list]]:
    """Rows of (layer, expert, rows) segments cut into k contiguous parts of about equal size:
    [(start, stop, segments of that part)]; a segment may be cut in two."""
    ends = list(itertools.accumulate(n for _, _, n in segments))
    spans = [(end - n, end, L, E) for (L, E, n), end in zip(segments, ends)]
    bounds = [ends[-1] * i // k for i in range(k + 1)] if ends else [0] * (k + 1)
    return [(a, b, [(L, E, min(b, stop) - max(a, start)) for start, stop, L, E in spans if start < b and stop > a])
            for a, b in zip(bounds, bounds[1:])]


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
                 credentials: grpc.ChannelCredentials | None = None, channel_options=(),
                 shared: str | None = None, local_hosts: frozenset[str] = frozenset({"127.0.0.1", "localhost"}),
                 split_min_rows: int = 32, wait_s: float = 30.0, wait_poll_s: float = 0.25):
        self.shard_of, self.lookup, self.forget = shard_of, lookup, forget
        self.call_timeout_s, self.refresh_s, self.wire_dtype = call_timeout_s, refresh_s, wire_dtype
        self.credentials = credentials
        # Replicas on one of these hosts get tensors through shared buffers ("shm"/"cuda_ipc").
        self.shared, self.local_hosts = shared, local_hosts
        self.split_min_rows = split_min_rows  # below this many rows per replica, one call is cheaper
        self.wait_s, self.wait_poll_s = wait_s, wait_poll_s
        keep_large_buffers()
        self.channel_options = EXPERT_CHANNEL_OPTIONS + list(channel_options)
        self.replicas: dict[str, list[_Replica]] = {}
        self._clients: dict[str, ExpertClient] = {}
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
            old = {r.address: r for rs in self.replicas.values() for r in rs}
            self.replicas = {}
            for shard, addresses in table.items():
                self.replicas[shard] = [old.get(a) or _Replica(a, self._client(a)) for a in addresses]
            live = {a for addresses in table.values() for a in addresses}
            for a in [a for a in self._clients if a not in live]:
                await self._clients.pop(a).close()

    def _client(self, address: str) -> ExpertClient:
        if address not in self._clients:
            local = address.rsplit(":", 1)[0] in self.local_hosts
            self._clients[address] = ExpertClient(address, options=self.channel_options, credentials=self.credentials,
                                                  shared=self.shared if local else None)
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
        await asyncio.gather(*(self._shard_call(shard, x_NH, y_NH, ranges, segs)
                               for shard, ranges, segs in split_by_shard(layer, counts_E, self.shard_of)))
        return y_NH

    async def _shard_call(self, shard: str, x_NH: torch.Tensor, y_NH: torch.Tensor, ranges, segments) -> None:
        """A shard's rows: one slice of x_NH (each expert its own shard, or adjacent ones) goes as it
        is, and its output lands straight in y_NH's slice; scattered rows are gathered and scattered."""
        if len(ranges) == 1:
            a, b = ranges[0]
            await self._call(shard, x_NH[a:b], segments, y_NH[a:b])
            return
        x_nH = gather_rows(x_NH, ranges)
        await self._call(shard, x_nH, segments, out := torch.empty_like(x_nH))
        scatter_rows(y_NH, ranges, out)

    async def _call(self, shard: str, x_nH: torch.Tensor, segments, out_nH: torch.Tensor) -> None:
        """A shard with several live replicas gets its rows split among them (data parallel), so a
        hot expert's extra replicas shorten the layer step, not only absorb other routers' calls."""
        now = time.monotonic()
        k = min(sum(r.dead_until <= now for r in self.replicas.get(shard, [])), x_nH.shape[0] // self.split_min_rows)
        if k < 2:
            await self._call_one(shard, x_nH, segments, out_nH)
            return
        await asyncio.gather(*(self._call_one(shard, x_nH[a:b], segs, out_nH[a:b])
                               for a, b, segs in split_segments(segments, k)))

    async def _call_one(self, shard: str, x_nH: torch.Tensor, segments, out_nH: torch.Tensor) -> None:
        deadline = STEP_DEADLINE.get() or time.monotonic() + self.call_timeout_s
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
                await replica.client.forward(x_nH, segments, timeout=min(remaining, self.call_timeout_s),
                                             wire_dtype=self.wire_dtype, out=out_nH)
                self.latencies.append((shard, time.perf_counter() - started))
                nbytes = x_nH.numel() * (DTYPES[self.wire_dtype].itemsize if self.wire_dtype else x_nH.element_size())
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
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
