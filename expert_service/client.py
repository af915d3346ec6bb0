"""ExpertClient: one grpc.aio channel to one expert replica; encode, call Forward, decode."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch

from expert_service import auth
from expert_service import shared as shared_buffers
from expert_service.doorbell import Doorbell
from expert_service.server import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from moe.v1 import expert_pb2, expert_pb2_grpc
from moe_core.codec import FLOAT_DTYPES, TAGS, WireError, decode, encode
from moe_core.staging import Staging


log = logging.getLogger(__name__)

_UNFINISHED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
# Same-node sessions refused and the rows sent as bytes instead, by reason, over this process's
# clients (the router's metrics read it): "full" (the replica's session quota), "refused" (it
# cannot map them: another node, say), "unreachable" (no doorbell from here).
FALLBACKS: Counter[str] = Counter()
RETRY_SHARED_S = 30.0  # after a full replica, how long its calls go as bytes before asking again


@dataclass
class _Session:
    id: str
    buffers: shared_buffers.Buffers
    doorbell: Doorbell
    used: float = field(default_factory=time.monotonic)


class ExpertClient:
    """Create inside the event loop that will use it (grpc.aio channels bind to their loop).

    `shared` ("shm" or "cuda_ipc") moves the tensors through buffers shared with a replica on
    this node, attached through the replica's doorbell socket (expert_service/doorbell.py); each
    call's small envelope then goes through the session's ring (expert_service/ring.py). If the replica cannot map the buffers (another node)
    or has no doorbell reachable from here, the client sends bytes on the wire for good; if its
    sessions are full (RESOURCE_EXHAUSTED), for RETRY_SHARED_S. Either is logged once per client
    and counted in FALLBACKS.

    Every call carries the data-plane key (`key`, default expert_service.auth.data_key()).
    """

    def __init__(self, address: str, options=CHANNEL_OPTIONS,
                 credentials: grpc.ChannelCredentials | None = None, shared: str | None = None,
                 key: str | None = None):
        self.address, self.shared = address, shared
        self.key = key or auth.data_key()
        self.metadata = auth.call_metadata(self.key)
        self._doorbell_path: str | None = None
        self._shared_after = 0.0  # monotonic time before which calls go as bytes (a full replica)
        self._logged: set[str] = set()
        self._free: list[_Session] = []
        self._detaching: set[asyncio.Task] = set()
        self.staging = Staging()  # pinned host buffer when x_TH lives on a GPU
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.max_elements = dict(options).get("grpc.max_receive_message_length", MAX_MESSAGE_BYTES) // 2

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float, wire_dtype: str | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of x_TH by (layer, expert, rows) segments -> [T, H] unweighted expert outputs, on
        x_TH's device in its dtype, written into `out` when given (the dispatcher's slice of the
        layer's output: no copy of its own).

        `wire_dtype` (e.g. "bfloat16") halves the bytes of a float32 x_TH; the reply comes back
        in that dtype and is cast to x_TH's. Raises grpc.aio.AioRpcError on a failed call.
        """
        if self.shared and time.monotonic() >= self._shared_after:
            try:
                return await self._forward_shared(x_TH, segments, timeout, out)
            except _Fallback:
                pass
        request = expert_pb2.ForwardRequest(
            hidden=encode(self.staging.to_host(x_TH), wire_dtype),
            segments=[expert_pb2.Segment(layer=L, expert=E, rows=n) for L, E, n in segments])
        reply = await self.stub.Forward(request, timeout=timeout, metadata=self.metadata)
        y_TH = decode(reply.output, allowed_dtypes=FLOAT_DTYPES, max_elements=self.max_elements,
                      expect_rank=2, expect_last_dim=x_TH.shape[-1], name="output")
        if y_TH.shape[0] != x_TH.shape[0]:
            raise WireError(f"{self.address} returned {y_TH.shape[0]} rows for {x_TH.shape[0]}")
        return self._deliver(y_TH, x_TH, out, copy=False)  # decoded into a tensor of its own

    def _deliver(self, y_TH: torch.Tensor, x_TH: torch.Tensor, out: torch.Tensor | None, copy: bool) -> torch.Tensor:
        """y_TH on x_TH's device in its dtype: written into `out` when given, else a tensor (a copy
        when `copy`, as for a shared buffer that the next call reuses)."""
        if x_TH.is_cuda and not y_TH.is_cuda:  # through pinned host memory
            y_TH = self.staging.to_device(y_TH, x_TH.device, x_TH.dtype)
        elif out is None:
            return y_TH.to(x_TH.device, x_TH.dtype, copy=copy)
        return y_TH if out is None else out.copy_(y_TH)

    async def _forward_shared(self, x_TH, segments, timeout, out):
        session = await self._acquire(x_TH, timeout)
        b, n = session.buffers, x_TH.shape[0]
        reusable = False
        try:
            b.x[:n].copy_(x_TH if b.x.is_cuda else self.staging.to_host(x_TH))
            if b.ready is not None:
                b.ready.record(torch.cuda.current_stream(b.x.device))
            await session.doorbell.forward(n, segments, timeout)
            session.used = time.monotonic()
            if b.done is not None:  # the copy below runs on this stream once the replica's output is written
                torch.cuda.current_stream(b.y.device).wait_event(b.done)
            y = self._deliver(b.y[:n], x_TH, out, copy=True)  # before the session is free again
            reusable = True
            return y
        except grpc.aio.AioRpcError as e:  # a status the replica answered with leaves the session usable
            reusable = e.code() not in _UNFINISHED and not session.doorbell.closed
            raise
        finally:
            if reusable:
                self._free.append(session)
            else:  # the replica may still be writing into these buffers: never reuse them
                self._forget(session)

    async def _acquire(self, x_TH, timeout) -> _Session:
        """A free session big enough for x_TH (sessions are reused; each call holds one). Raises
        _Fallback when this call's rows should go as bytes."""
        n, hidden = x_TH.shape
        now = time.monotonic()
        for s in [s for s in self._free if s.doorbell.closed or now - s.used > s.doorbell.idle_s / 2]:
            self._free.remove(s)  # closed by the replica, or about to be: idle sessions expire there
            s.doorbell.close()
        for i, s in enumerate(self._free):
            if s.buffers.capacity >= n and s.buffers.x.dtype == x_TH.dtype:
                return self._free.pop(i)
        if self._free:  # too small: replace the smallest
            await self._detach(self._free.pop(0), timeout)
        if self._doorbell_path is None:
            self._doorbell_path = (await self.info(timeout=timeout)).doorbell
        if not self._doorbell_path:
            self._fall_back("unreachable", "the replica offers no doorbell", for_good=True)
        capacity = max(64, 1 << (n - 1).bit_length())
        b = shared_buffers.create(self.shared, capacity, hidden, x_TH.dtype, x_TH.device)
        try:
            doorbell = await Doorbell.attach(self._doorbell_path, self.key, b, dtype=TAGS[x_TH.dtype],
                                             timeout=timeout, probe=self._probe)
        except OSError as e:  # another network namespace
            self._fall_back("unreachable", f"its doorbell cannot be reached ({e})", for_good=True)
        except grpc.aio.AioRpcError as e:
            # Full, or closed on us (a replica at its connection cap may close before its answer is
            # read): bytes for a while; a replica that is really gone fails the bytes call too.
            if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                self._shared_after = time.monotonic() + RETRY_SHARED_S
                self._fall_back("full", e.details())
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self._fall_back("refused", e.details(), for_good=True)
            raise
        finally:
            b.close_fds()  # the replica holds its own copies now, or never will
        return _Session(doorbell.session, b, doorbell)

    def _fall_back(self, reason: str, why: str, for_good: bool = False):
        FALLBACKS[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("expert replica %s: %s; its rows go as bytes over gRPC%s", self.address, why,
                        "" if for_good else f" for {RETRY_SHARED_S:.0f} s")
        if for_good:
            self.shared = None
        raise _Fallback(why)

    async def _probe(self) -> None:
        """Raises grpc.aio.AioRpcError unless the replica answers Info in time (doorbell liveness)."""
        await self.info(timeout=Doorbell.probe_timeout_s)

    def _forget(self, session: _Session) -> None:
        """Detaches a session in the background (this may run while a cancellation unwinds)."""
        task = asyncio.ensure_future(self._detach(session, timeout=5.0))
        self._detaching.add(task)
        task.add_done_callback(self._detaching.discard)

    async def _detach(self, session: _Session, timeout):
        session.doorbell.close()  # closing its connection detaches it on the replica

    async def info(self, *, timeout: float) -> expert_pb2.InfoReply:
        return await self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout, metadata=self.metadata)

    async def close(self) -> None:
        while self._free:
            await self._detach(self._free.pop(), timeout=1.0)
        if self._detaching:
            await asyncio.wait(self._detaching)
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _Fallback(Exception):
    """This call's rows go as bytes (the reason is logged and counted already)."""
