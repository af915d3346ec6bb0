"""A same-node session's doorbell: its Forwards over a Unix-domain socket instead of gRPC.

A session's shared buffers already carry the rows, so all a call still moves is (rows, segments)
one way and a status the other. On the H200 machine an empty gRPC round trip took 0.67 ms, against
a layer's ~2 ms of expert math, and a whole one-row Forward through a CUDA IPC session and this
socket 0.58 ms, its expert math included (benchmarks/call_overhead.py).

The socket has an abstract name (Linux): no file to clean up, gone with the process. A connection
serves the one session its first frame names; the session id, 128 random bits handed out only by
an Attach over gRPC (and its TLS, where on), is the credential. Calls on a connection run one at a
time, and closing it detaches the session. A client that cannot connect (another network
namespace, not Linux) keeps sending its Forwards over gRPC.

A Unix socket has no keepalive: a replica that stops without closing it (a stopped or wedged
process) would hold a call until its deadline. So a call that has had no reply for 10 s asks the
replica's gRPC Info (within 5 s: Doorbell.probe_after_s, probe_timeout_s); if that
fails the call fails UNAVAILABLE, and the dispatcher retries it on another replica, within about
the 15 s after which gRPC gives up on a silent connection. A replica that answers Info is busy,
not gone, and the call waits on.

Frames: a 4-byte big-endian length, then msgpack. Request: [session, rows, [layer, expert, rows,
layer, expert, rows, ...]]. Reply: [code, details], code a grpc.StatusCode value (0 is OK).
"""
from __future__ import annotations

import asyncio
import socket
import struct
import sys
import uuid

import grpc
import msgpack

from moe_core.codec import WireError

MAX_FRAME = 1 << 20  # 4096 segments of three integers take under 64 KB
_LEN = struct.Struct(">I")


class FrameError(WireError):
    """A frame that is not [session, rows, segments]; the connection is closed after the reply."""


def pack(obj) -> bytes:
    body = msgpack.packb(obj)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader):
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        return msgpack.unpackb(await reader.readexactly(n))
    except (ValueError, msgpack.ExtraData) as e:
        raise FrameError(f"frame is not msgpack: {e}") from None


def parse_request(frame, max_segments: int) -> tuple[str, int, list[tuple[int, int, int]]]:
    if not (isinstance(frame, list) and len(frame) == 3 and isinstance(frame[0], str)
            and isinstance(frame[1], int) and isinstance(frame[2], list)):
        raise FrameError("a request frame is [session, rows, segments]")
    session, rows, flat = frame
    if len(flat) % 3 or len(flat) > 3 * max_segments:
        raise FrameError(f"segments must be at most {max_segments} (layer, expert, rows) triples")
    if not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in [rows, *flat]):
        raise FrameError("rows and segments must be integers in [0, 2**32)")
    return session, rows, list(zip(flat[0::3], flat[1::3], flat[2::3]))


class DoorbellServer:
    """`forward(session, rows, segments)` is the servicer's call: it returns None or raises
    WireError (INVALID_ARGUMENT) or any other exception (INTERNAL); `detach(session)` runs when a
    connection closes."""

    def __init__(self, forward, detach, max_segments: int):
        self.forward, self.detach, self.max_segments = forward, detach, max_segments
        self.path = f"\0moe-doorbell-{uuid.uuid4().hex}"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        """The socket's name, or "" where abstract Unix sockets do not exist."""
        if not sys.platform.startswith("linux"):
            return ""
        self._server = await asyncio.start_unix_server(self._serve, sock=_unix_socket(self.path, listen=True))
        return self.path

    async def _serve(self, reader, writer):
        bound = None  # the session this connection serves, from its first frame
        try:
            while True:
                try:
                    session, rows, segments = parse_request(await read_frame(reader), self.max_segments)
                    if bound not in (None, session):
                        raise FrameError("a doorbell connection serves one session")
                    bound = session
                    await self.forward(session, rows, segments)
                    reply = [0, ""]
                except FrameError as e:
                    writer.write(pack([grpc.StatusCode.INVALID_ARGUMENT.value[0], str(e)]))
                    break
                except WireError as e:
                    reply = [grpc.StatusCode.INVALID_ARGUMENT.value[0], str(e)]
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                except Exception as e:  # a fault of ours; the servicer has logged it
                    reply = [grpc.StatusCode.INTERNAL.value[0], f"expert compute failed: {type(e).__name__}"]
                writer.write(pack(reply))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if bound is not None:
                self.detach(bound)
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


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
    """The client end of one session's connection; a call at a time. `probe()` checks that the
    replica is alive (its gRPC Info, within probe_timeout_s) and raises if not."""
    probe_after_s = 10.0
    probe_timeout_s = 5.0

    def __init__(self, reader, writer, probe=None):
        self.reader, self.writer, self.probe = reader, writer, probe

    @classmethod
    async def connect(cls, path: str, probe=None) -> Doorbell:
        return cls(*await asyncio.open_unix_connection(sock=_unix_socket(path)), probe=probe)

    async def forward(self, session: str, rows: int, segments, timeout: float) -> None:
        """Raises grpc.aio.AioRpcError like a gRPC Forward would. After any error but a status
        from the replica, the connection is closed and the session is no longer usable."""
        flat = [v for seg in segments for v in seg]
        try:
            self.writer.write(pack([session, rows, flat]))
            code, details = await self._reply(timeout)
        except asyncio.TimeoutError:
            self.close()
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "doorbell call timed out") from None
        except (asyncio.IncompleteReadError, ConnectionError, FrameError, ValueError, TypeError):
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, "expert replica closed its doorbell") from None
        except grpc.aio.AioRpcError as e:  # the probe failed
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE,
                         f"expert replica stopped answering (Info: {e.code().name})") from None
        except BaseException:  # cancelled mid-call: the reply would be read by the next call
            self.close()
            raise
        if code:
            raise _error(_CODES.get(code, grpc.StatusCode.UNKNOWN), details)

    async def _reply(self, timeout: float):
        """The reply frame; every probe_after_s without one, the replica is probed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        read = asyncio.ensure_future(read_frame(self.reader))
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait({read}, timeout=min(left, self.probe_after_s))
                if done:
                    return read.result()
                if self.probe is not None and left > self.probe_after_s:
                    await self.probe()
        finally:
            if not read.done():
                read.cancel()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()
