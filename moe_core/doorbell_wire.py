"""The doorbell socket's wire format, both ends: length-prefixed msgpack frames, the Attach
frame's layout, and the abstract Unix socket itself.

Frames: a 4-byte big-endian length, then msgpack.
Attach: ["attach", key, kind, dtype, capacity, hidden, [handles], [events], device_uuid] with the
descriptors (shm: the two buffers' memfds; then the ring's control memfd, the replica's eventfd
and the client's); reply [0, "", session, idle_s] or [code, details]. code is a grpc.StatusCode
value (0 is OK).
"""
from __future__ import annotations

import asyncio
import socket
import struct

import grpc
import msgpack

from moe_core.codec import WireError

LEN = struct.Struct(">I")
MAX_FDS = 5  # two shm buffers, the ring's control block and its two eventfds
CODES = {c.value[0]: c for c in grpc.StatusCode}


class FrameError(WireError):
    """A frame that is not what the protocol allows; the connection is closed after the reply."""


def pack(obj) -> bytes:
    body = msgpack.packb(obj)
    return LEN.pack(len(body)) + body


def unpack(body: bytes):
    try:
        return msgpack.unpackb(body)
    except (ValueError, msgpack.ExtraData) as e:
        raise FrameError(f"frame is not msgpack: {e}") from None


async def read_frame(reader: asyncio.StreamReader, max_frame: int = 1 << 20, timeout: float | None = None,
                     idle: float | None = None):
    """A frame, waiting up to `idle` for it to start and `timeout` for the rest."""
    (n,) = LEN.unpack(await asyncio.wait_for(reader.readexactly(LEN.size), idle))
    if n > max_frame:
        raise FrameError(f"frame of {n} bytes exceeds {max_frame}")
    return unpack(await asyncio.wait_for(reader.readexactly(n), timeout))


def attach_frame(key: str, buffers, dtype: str) -> bytes:
    """The Attach of `buffers` (moe_core.shared.Buffers); their descriptors go beside it."""
    ipc = buffers.kind == "cuda_ipc"
    return pack(["attach", key, buffers.kind, dtype, buffers.capacity, buffers.x.shape[1],
                 list(buffers.handles) if ipc else [], list(buffers.events) if ipc else [], buffers.device_uuid])


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


def unix_socket(name: str, listen: bool = False) -> socket.socket:
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
