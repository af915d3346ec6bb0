"""The same-node session channel ("shm", "cuda_ipc"): the rows through buffers shared with a
replica on this node, each call's envelope through the session's ring (moe_core/ring.py).

A session is attached once over the replica's doorbell socket (server end:
expert_service/doorbell.py), passing its buffers and its ring as file descriptors or CUDA IPC
handles; the socket then stays open for liveness. Sessions are reused, one call at a time each.
If the replica cannot map the buffers (another node) or has no doorbell reachable from here,
the channel sends its rows as bytes over gRPC for good; if its sessions are full
(RESOURCE_EXHAUSTED), for RETRY_SHARED_S. Either is logged once per channel and counted in
FALLBACKS.

A Unix socket has no keepalive: a replica that stops without closing it (a stopped or wedged
process) would hold a call until its deadline. So a call that has had no answer for 10 s asks the
replica's gRPC Info (within 5 s: Doorbell.probe_after_s, probe_timeout_s); if that fails the call
fails UNAVAILABLE, and the pool retries it on another replica, within about the 15 s after which
gRPC gives up on a silent connection. A replica that answers Info is busy, not gone.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import grpc
import torch

from moe_core import ring
from moe_core import shared as shared_buffers
from moe_core.codec import TAGS
from moe_core.doorbell_wire import CODES, FrameError, attach_frame, read_frame, unix_socket
from moe_core.staging import Staging
from router_service.channels import FALLBACKS, deliver, error
from router_service.channels.grpc_bytes import BytesChannel

log = logging.getLogger(__name__)

_UNFINISHED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
RETRY_SHARED_S = 30.0  # after a full replica, how long its calls go as bytes before asking again


@dataclass
class _Session:
    id: str
    buffers: shared_buffers.Buffers
    doorbell: Doorbell
    used: float = field(default_factory=time.monotonic)


class SessionChannel:
    """Create inside the event loop that will use it. `kind` is "shm" or "cuda_ipc"; the other
    arguments are the bytes channel's (Info, and the fallback)."""

    def __init__(self, address: str, kind: str, **bytes_options):
        if kind not in ("shm", "cuda_ipc"):
            raise ValueError(f"a session's buffers are shm or cuda_ipc, not {kind!r}")
        self.address, self.kind = address, kind
        self.bytes = BytesChannel(address, **bytes_options)
        self.wire_itemsize = None  # rows in their own dtype (the bytes fallback counts as such too)
        self._doorbell_path: str | None = None
        self._shared_after = 0.0  # monotonic time before which calls go as bytes (a full replica)
        self._logged: set[str] = set()
        self._free: list[_Session] = []
        self._detaching: set[asyncio.Task] = set()
        self.staging = Staging()  # pinned host buffer for GPU rows into /dev/shm buffers

    async def forward(self, x_TH: torch.Tensor, segments, *, timeout: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind is not None and time.monotonic() >= self._shared_after:
            try:
                return await self._forward_shared(x_TH, segments, timeout, out)
            except _Fallback:
                pass
        return await self.bytes.forward(x_TH, segments, timeout=timeout, out=out)

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
            y = deliver(b.y[:n], x_TH, out, self.staging, copy=True)  # before the session is free again
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
            self._doorbell_path = (await self.bytes.info(timeout=timeout)).doorbell
        if not self._doorbell_path:
            self._fall_back("unreachable", "the replica offers no doorbell", for_good=True)
        capacity = max(64, 1 << (n - 1).bit_length())
        b = shared_buffers.create(self.kind, capacity, hidden, x_TH.dtype, x_TH.device)
        try:
            doorbell = await Doorbell.attach(self._doorbell_path, self.bytes.key, b, dtype=TAGS[x_TH.dtype],
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
            self.kind = None
        raise _Fallback(why)

    async def _probe(self) -> None:
        """Raises grpc.aio.AioRpcError unless the replica answers Info in time (doorbell liveness)."""
        await self.bytes.info(timeout=Doorbell.probe_timeout_s)

    def _forget(self, session: _Session) -> None:
        """Detaches a session in the background (this may run while a cancellation unwinds)."""
        task = asyncio.ensure_future(self._detach(session, timeout=5.0))
        self._detaching.add(task)
        task.add_done_callback(self._detaching.discard)

    async def _detach(self, session: _Session, timeout):
        session.doorbell.close()  # closing its connection detaches it on the replica

    async def info(self, *, timeout: float):
        return await self.bytes.info(timeout=timeout)

    async def close(self) -> None:
        while self._free:
            await self._detach(self._free.pop(), timeout=1.0)
        if self._detaching:
            await asyncio.wait(self._detaching)
        await self.bytes.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _Fallback(Exception):
    """This call's rows go as bytes (the reason is logged and counted already)."""


class Doorbell:
    """The client end of one session: its connection and its ring; a call at a time. `probe()`
    checks that the replica is alive (its gRPC Info, within probe_timeout_s) and raises if not."""
    probe_after_s = 10.0
    probe_timeout_s = 5.0

    def __init__(self, reader, writer, session: str, idle_s: float, control: ring.Control, wake: int,
                 notify: int, probe=None, spin_s: float | None = None):
        self.reader, self.writer, self.probe = reader, writer, probe
        self.session, self.idle_s = session, idle_s
        self.control, self.wake, self.notify = control, wake, notify  # ring the replica / rung by it
        self.spin_s = ring.default_spin_s() if spin_s is None else spin_s
        self.seq = 0
        self._gone = asyncio.ensure_future(reader.read(1))  # done when the replica closes the connection

    @classmethod
    async def attach(cls, path: str, key: str, buffers, *, dtype: str, timeout: float, probe=None) -> Doorbell:
        """Connects and attaches `buffers` (moe_core.shared.Buffers) with a new ring. Raises
        OSError when the socket cannot be reached, grpc.aio.AioRpcError when the replica refuses
        the session."""
        control, control_fd = ring.Control.create()
        wake, notify = ring.eventfd(), ring.eventfd()
        try:
            reader, writer, reply = await cls._attach(path, key, buffers, dtype, timeout,
                                                      [*buffers.fds, control_fd, wake, notify])
        except BaseException:
            os.close(wake)
            os.close(notify)
            raise
        finally:
            os.close(control_fd)  # mapped here, and by the replica if it took the session
        return cls(reader, writer, reply[2], float(reply[3]), control, wake, notify, probe)

    @staticmethod
    async def _attach(path, key, buffers, dtype, timeout, fds):
        sock = unix_socket(path)
        try:
            frame = attach_frame(key, buffers, dtype)
            sock.setblocking(True)  # a small frame into an empty local socket: does not wait
            try:
                socket.send_fds(sock, [frame], fds)
            except OSError:  # refused and closed at once (a replica at its connection cap)
                raise error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
            sock.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            reply = await read_frame(reader, timeout=timeout, idle=timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise error(grpc.StatusCode.DEADLINE_EXCEEDED, "doorbell attach timed out") from None
        except (asyncio.IncompleteReadError, ConnectionError, FrameError):
            writer.close()
            raise error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
        if not (isinstance(reply, list) and reply and isinstance(reply[0], int)) or (reply[0] == 0 and len(reply) != 4):
            writer.close()
            raise error(grpc.StatusCode.UNAVAILABLE, "expert replica's doorbell answered nonsense")
        if reply[0]:
            writer.close()
            raise error(CODES.get(reply[0], grpc.StatusCode.UNKNOWN), str(reply[1]))
        return reader, writer, reply

    async def forward(self, rows: int, segments, timeout: float) -> None:
        """Raises grpc.aio.AioRpcError like a gRPC Forward would. After any error but a status
        from the replica, the session is closed and no longer usable."""
        if self.closed:
            raise error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell")
        self.seq += 1
        self.control.post(self.seq, rows, segments)
        ring.ring(self.wake)
        try:
            await self._answer(timeout)
        except asyncio.TimeoutError:
            self.close()
            raise error(grpc.StatusCode.DEADLINE_EXCEEDED, "doorbell call timed out") from None
        except ConnectionError:
            self.close()
            raise error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
        except grpc.aio.AioRpcError as e:  # the probe failed
            self.close()
            raise error(grpc.StatusCode.UNAVAILABLE,
                         f"expert replica stopped answering (Info: {e.code().name})") from None
        except BaseException:  # cancelled mid-call: the replica may still write the buffers
            self.close()
            raise
        w = self.control.words
        if w[ring.CODE]:
            raise error(CODES.get(w[ring.CODE], grpc.StatusCode.UNKNOWN), self.control.details())

    async def _answer(self, timeout: float) -> None:
        """Until the replica has answered this call: a yield (so the layer's other calls post
        theirs), a bounded spin, then the client's eventfd; every probe_after_s, the replica is
        probed; its connection closing ends the wait UNAVAILABLE."""
        w, seq = self.control.words, self.seq
        await asyncio.sleep(0)
        spin_until = time.perf_counter() + self.spin_s
        while w[ring.RESP] != seq and time.perf_counter() < spin_until:
            pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while w[ring.RESP] != seq:
            ring.drain(self.notify)
            if w[ring.RESP] == seq:
                break
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            rung = loop.create_future()
            loop.add_reader(self.notify, lambda: rung.done() or rung.set_result(None))
            try:
                done, _ = await asyncio.wait({rung, self._gone}, timeout=min(left, self.probe_after_s),
                                            return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(self.notify)
            if self._gone in done and w[ring.RESP] != seq:
                raise ConnectionError("expert replica closed its doorbell")
            if not done and self.probe is not None and deadline - loop.time() > self.probe_after_s:
                await self.probe()

    @property
    def closed(self) -> bool:
        """Closed here, or by the replica (it closes idle sessions)."""
        return self.writer.is_closing() or self._gone.done()

    def close(self) -> None:
        if not self._gone.done():
            self._gone.cancel()
        if self.wake >= 0:
            os.close(self.wake)
            os.close(self.notify)
            self.wake = self.notify = -1
        self.writer.close()
