"""The replica's doorbell: the server end of same-node sessions' Attach and liveness, over an
abstract Unix-domain socket (wire format: moe_core/doorbell_wire.py; the client end:
router_service/channels/session.py).

The session's shared buffers carry the rows and its ring (moe_core/ring.py) each call's
envelope and status, so the socket carries only the Attach, which passes the ring's control
block and eventfds with the buffers, and then stays open: closing it (either side, or the process
dying) detaches the session.

The socket has an abstract name (Linux): no file to clean up, gone with the process, reachable
from this network namespace only. Every connection is checked before it is read from:

- the peer's SO_PEERCRED uid must be this process's (another user's process is closed at once);
- at most `Limits.connections` connections, `Limits.per_peer` from one process (pid), else the
  connection gets RESOURCE_EXHAUSTED;
- its first frame, the Attach, must arrive whole within `Limits.first_frame_s` and is at most
  `Limits.attach_bytes` long; it carries the data-plane key (moe_core/auth.py), checked in
  constant time, else UNAUTHENTICATED; and the session's buffers (memfd descriptors by
  SCM_RIGHTS, or CUDA IPC handles: no names another process could open);
- nothing may follow it (a byte after the Attach closes the connection); a session with no call
  for `Limits.idle_s` is closed.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc

from moe_core import auth
from moe_core.codec import WireError
from moe_core.doorbell_wire import LEN, MAX_FDS, FrameError, pack, parse_attach, unix_socket, unpack



@dataclass(frozen=True)
class Limits:
    connections: int = 256      # sessions on one replica: a few per router and micro-batch
    per_peer: int = 64          # from one process
    first_frame_s: float = 2.0  # a frame, once started, arrives whole within this
    idle_s: float = 600.0       # a session's connection with no call for this long is closed
    attach_bytes: int = 4096    # key, two CUDA IPC descriptors and two event handles take under 1 KB


class Refused(Exception):
    """Answered with `code` and the connection closed (bad key, too many sessions)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


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
        self._listener = unix_socket(self.path, listen=True)
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
                (n,) = LEN.unpack(await _recv_with_fds(conn, LEN.size, fds))
                if n > self.limits.attach_bytes:
                    raise FrameError(f"attach frame of {n} bytes exceeds {self.limits.attach_bytes}")
                return unpack(await _recv_with_fds(conn, n, fds))
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
