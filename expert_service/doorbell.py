"""A same-node session's doorbell: its Attach, and its liveness, over a Unix-domain socket.

The session's shared buffers carry the rows and its ring (expert_service/ring.py) each call's
envelope and status, so the socket carries only the Attach, which passes the ring's control
block and eventfds with the buffers, and then stays open: closing it (either side, or the process
dying) detaches the session.

The socket has an abstract name (Linux): no file to clean up, gone with the process, reachable
from this network namespace only. Every connection is checked before it is read from:

- the peer's SO_PEERCRED uid must be this process's (another user's process is closed at once);
- at most `Limits.connections` connections, `Limits.per_peer` from one process (pid), else the
  connection gets RESOURCE_EXHAUSTED;
- its first frame, the Attach, must arrive whole within `Limits.first_frame_s` and is at most
  `Limits.attach_bytes` long; it carries the data-plane key (expert_service/auth.py), checked in
  constant time, else UNAUTHENTICATED; and the session's buffers (memfd descriptors by
  SCM_RIGHTS, or CUDA IPC handles: no names another process could open);
- nothing may follow it (a byte after the Attach closes the connection); a session with no call
  for `Limits.idle_s` is closed.

A client that cannot connect (another network namespace, not Linux) sends its rows as bytes over
gRPC.

A Unix socket has no keepalive: a replica that stops without closing it (a stopped or wedged
process) would hold a call until its deadline. So a call that has had no answer for 10 s asks the
replica's gRPC Info (within 5 s: Doorbell.probe_after_s, probe_timeout_s); if that fails the call
fails UNAVAILABLE, and the dispatcher retries it on another replica, within about the 15 s after
which gRPC gives up on a silent connection. A replica that answers Info is busy, not gone.

Frames: a 4-byte big-endian length, then msgpack.
Attach: ["attach", key, kind, dtype, capacity, hidden, [handles], [events], device_uuid] with the
descriptors (shm: the two buffers' memfds; then the ring's control memfd, the replica's eventfd
and the client's); reply [0, "", session, idle_s] or [code, details]. code is a grpc.StatusCode
value (0 is OK).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc
import msgpack

from expert_service import auth, ring
from moe_core.codec import WireError

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FDS = 5  # two shm buffers, the ring's control block and its two eventfds


@dataclass(frozen=True)
class Limits:
    connections: int = 256      # sessions on one replica: a few per router and micro-batch
    per_peer: int = 64          # from one process
    first_frame_s: float = 2.0  # a frame, once started, arrives whole within this
    idle_s: float = 600.0       # a session's connection with no call for this long is closed
    attach_bytes: int = 4096    # key, two CUDA IPC descriptors and two event handles take under 1 KB


class FrameError(WireError):
    """A frame that is not what the protocol allows; the connection is closed after the reply."""


class Refused(Exception):
    """Answered with `code` and the connection closed (bad key, too many sessions)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


def pack(obj) -> bytes:
    body = msgpack.packb(obj)
    return _LEN.pack(len(body)) + body


def _unpack(body: bytes):
    try:
        return msgpack.unpackb(body)
    except (ValueError, msgpack.ExtraData) as e:
        raise FrameError(f"frame is not msgpack: {e}") from None


async def read_frame(reader: asyncio.StreamReader, max_frame: int = 1 << 20, timeout: float | None = None,
                     idle: float | None = None):
    """A frame, waiting up to `idle` for it to start and `timeout` for the rest."""
    (n,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), idle))
    if n > max_frame:
        raise FrameError(f"frame of {n} bytes exceeds {max_frame}")
    return _unpack(await asyncio.wait_for(reader.readexactly(n), timeout))


async def _recv_with_fds(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """Exactly n bytes from a non-blocking socket, keeping any descriptors that came with them
    (asyncio's streams would drop them: the kernel closes descriptors a plain recv does not take)."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        try:
            chunk, got, flags, _ = socket.recv_fds(sock, n - len(data), MAX_FDS - len(fds))
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                loop.remove_reader(sock.fileno())
            continue
        fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise FrameError(f"an Attach passes at most {MAX_FDS} file descriptors")
        if not chunk:
            raise asyncio.IncompleteReadError(data, n)
        data += chunk
    return data


def parse_attach(frame) -> dict:
    if not (isinstance(frame, list) and len(frame) == 9 and frame[0] == "attach"
            and all(isinstance(v, str) for v in (frame[1], frame[2], frame[3], frame[8]))
            and all(isinstance(v, int) for v in frame[4:6])
            and all(isinstance(v, list) and len(v) <= 2 and all(isinstance(b, bytes) for b in v) for v in frame[6:8])):
        raise FrameError('an Attach frame is ["attach", key, kind, dtype, capacity, hidden, handles, events, '
                         'device_uuid]')
    _, key, kind, dtype, capacity, hidden, handles, events, device_uuid = frame
    return dict(key=key, kind=kind, dtype=dtype, capacity=capacity, hidden=hidden, handles=tuple(handles),
                events=tuple(events), device_uuid=device_uuid)


def _code(c: grpc.StatusCode) -> int:
    return c.value[0]


class DoorbellServer:
    """`attach(request, fds, pid)` maps a session's buffers, starts its ring and returns its id, or
    raises SharedError/WireError (INVALID_ARGUMENT) or Refused; `detach(session)` runs when the
    connection closes; `last_call(session)` is when its ring last served a call (monotonic).
    `key` is the data-plane key."""

    def __init__(self, attach, detach, last_call, key: str, limits: Limits = Limits()):
        self.attach, self.detach, self.last_call = attach, detach, last_call
        self.key, self.limits = key, limits
        self.path = f"\0moe-doorbell-{uuid.uuid4().hex}"
        self.peers: Counter[int] = Counter()  # open connections per pid
        self.refused: Counter[str] = Counter()  # why connections were turned away
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> str:
        """The socket's name, or "" where abstract Unix sockets do not exist."""
        if not sys.platform.startswith("linux"):
            return ""
        self._listener = _unix_socket(self.path, listen=True)
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        return self.path

    @property
    def connections(self) -> int:
        return sum(self.peers.values())

    async def _accept(self):
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            pid, uid, _ = auth.peer_credentials(conn)
            if uid != os.getuid():  # another user: not a word
                self.refused["uid"] += 1
                conn.close()
                continue
            if self.connections >= self.limits.connections or self.peers[pid] >= self.limits.per_peer:
                self.refused["quota"] += 1
                _send_quietly(conn, pack([_code(grpc.StatusCode.RESOURCE_EXHAUSTED),
                                          f"doorbell: {self.connections} connections open, {self.peers[pid]} from "
                                          f"this process (limits {self.limits.connections}, {self.limits.per_peer})"]))
                conn.close()
                continue
            self.peers[pid] += 1
            task = loop.create_task(self._serve(conn, pid))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handshake(self, conn: socket.socket, pid: int) -> str:
        fds: list[int] = []
        try:
            async def first():
                (n,) = _LEN.unpack(await _recv_with_fds(conn, _LEN.size, fds))
                if n > self.limits.attach_bytes:
                    raise FrameError(f"attach frame of {n} bytes exceeds {self.limits.attach_bytes}")
                return _unpack(await _recv_with_fds(conn, n, fds))
            try:
                request = parse_attach(await asyncio.wait_for(first(), self.limits.first_frame_s))
            except asyncio.TimeoutError:
                raise FrameError(f"no whole Attach frame within {self.limits.first_frame_s} s") from None
            try:
                auth.check_key(request.pop("key"), self.key)
            except auth.AuthError as e:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
            return self.attach(request, fds, pid)
        finally:
            for fd in fds:  # mapped by now, or refused
                os.close(fd)

    async def _serve(self, conn: socket.socket, pid: int):
        session, writer = None, None
        try:
            try:
                session = await self._handshake(conn, pid)
                reply = [0, "", session, self.limits.idle_s]
            except Refused as e:
                reply = [_code(e.code), str(e)]
            except WireError as e:  # SharedError and FrameError are WireErrors
                reply = [_code(grpc.StatusCode.INVALID_ARGUMENT), str(e)]
            reader, writer = await asyncio.open_unix_connection(sock=conn)
            writer.write(pack(reply))
            await writer.drain()
            if session is None:
                return
            # Calls go through the ring; the connection only says the client is there.
            while True:
                idle = time.monotonic() - self.last_call(session)
                if idle >= self.limits.idle_s:
                    break
                try:  # a byte (nothing may follow the Attach) or the end: either closes it
                    await asyncio.wait_for(reader.read(1), self.limits.idle_s - idle)
                    break
                except asyncio.TimeoutError:
                    continue
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.peers[pid] -= 1
            if not self.peers[pid]:
                del self.peers[pid]
            if session is not None:
                self.detach(session)
            if writer is not None:
                writer.close()
            else:
                conn.close()

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._connections):
            task.cancel()
        if self._listener is not None:
            self._listener.close()

    async def stop(self) -> None:
        """close(), then waits until the accept loop and every connection have ended."""
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        self.close()
        await asyncio.gather(*tasks, return_exceptions=True)


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    """Answers a refused connection. What it sent is read first (its descriptors closed): closing
    a Unix socket with unread data resets the peer, which would lose the answer."""
    try:
        while True:
            _, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
            for fd in fds:
                os.close(fd)
    except OSError:
        pass
    try:
        conn.send(data)
    except OSError:
        pass


def _unix_socket(name: str, listen: bool = False) -> socket.socket:
    """A bound and listening, or connected, non-blocking Unix socket. Made here, not by asyncio:
    uvloop (Ray Serve's event loop) refuses abstract names (EINVAL). A local connect does not block."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if listen:
            sock.bind(name)
            sock.listen(128)
        else:
            sock.connect(name)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error the dispatcher already handles for gRPC calls (UNAVAILABLE is retried elsewhere)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


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
        """Connects and attaches `buffers` (expert_service.shared.Buffers) with a new ring. Raises
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
        sock = _unix_socket(path)
        try:
            frame = pack(["attach", key, buffers.kind, dtype, buffers.capacity, buffers.x.shape[1],
                          list(buffers.handles) if buffers.kind == "cuda_ipc" else [],
                          list(buffers.events) if buffers.kind == "cuda_ipc" else [], buffers.device_uuid])
            sock.setblocking(True)  # a small frame into an empty local socket: does not wait
            try:
                socket.send_fds(sock, [frame], fds)
            except OSError:  # refused and closed at once (a replica at its connection cap)
                raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
            sock.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            reply = await read_frame(reader, timeout=timeout, idle=timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "doorbell attach timed out") from None
        except (asyncio.IncompleteReadError, ConnectionError, FrameError):
            writer.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
        if not (isinstance(reply, list) and reply and isinstance(reply[0], int)) or (reply[0] == 0 and len(reply) != 4):
            writer.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica's doorbell answered nonsense")
        if reply[0]:
            writer.close()
            raise _error(_CODES.get(reply[0], grpc.StatusCode.UNKNOWN), str(reply[1]))
        return reader, writer, reply

    async def forward(self, rows: int, segments, timeout: float) -> None:
        """Raises grpc.aio.AioRpcError like a gRPC Forward would. After any error but a status
        from the replica, the session is closed and no longer usable."""
        if self.closed:
            raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell")
        self.seq += 1
        self.control.post(self.seq, rows, segments)
        ring.ring(self.wake)
        try:
            await self._answer(timeout)
        except asyncio.TimeoutError:
            self.close()
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "doorbell call timed out") from None
        except ConnectionError:
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
        except grpc.aio.AioRpcError as e:  # the probe failed
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE,
                         f"expert replica stopped answering (Info: {e.code().name})") from None
        except BaseException:  # cancelled mid-call: the replica may still write the buffers
            self.close()
            raise
        w = self.control.words
        if w[ring.CODE]:
            raise _error(_CODES.get(w[ring.CODE], grpc.StatusCode.UNKNOWN), self.control.details())

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
