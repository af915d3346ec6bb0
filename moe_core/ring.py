"""A same-node session's calls through a control block both processes map: no socket and no
event-loop wake-up on the hot path.

A call: the client writes its rows into the session's input buffer and the envelope (rows and
(layer, expert, rows) segments) into the control block, bumps `req`, and rings the replica's
eventfd; the replica's ring thread computes, writes the status, sets `resp` to `req` and rings
the client's eventfd. Each side first spins on the other's counter for a bounded time (`spin_s`;
none on a machine with few cores, where a spinner takes the core its peer needs), then blocks on
its eventfd. Every post rings the eventfd, so a sleeper is never missed without the store-load
fence Python cannot issue.

The control block is a sealed memfd and the two eventfds pass with the Attach over the doorbell
socket (expert_service/doorbell.py), which stays open for liveness: closing it detaches the
session, and a client with no answer for a while probes the replica's Info.

Layout, int64 words: 0 req, 1 resp, 2 rows, 3 segments, 4 status (a grpc.StatusCode value),
5 details length; the segments from word 8 (three words each), then the details (utf-8).
"""
from __future__ import annotations

import array
import mmap
import os

import grpc

from moe_core.shared import sealed_memfd

REQ, RESP, ROWS, NSEG, CODE, DLEN, SEG = 0, 1, 2, 3, 4, 5, 8
MAX_SEGMENTS = 4096
DETAILS_BYTES = 1024
_DETAILS_AT = 8 * (SEG + 3 * MAX_SEGMENTS)
CONTROL_BYTES = _DETAILS_AT + DETAILS_BYTES
INVALID, INTERNAL = (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.INTERNAL.value[0])


def default_spin_s() -> float:
    """How long a side spins before it blocks: MOE_RING_SPIN_US microseconds when set; else 5 ms
    where cores are plenty (a replica called once a decode step stays awake through the step, the
    router through a call) and none where they are few."""
    us = os.environ.get("MOE_RING_SPIN_US")
    if us is not None:
        return float(us) * 1e-6
    return 5e-3 if (os.cpu_count() or 1) >= 8 else 0.0


class Control:
    """The control block's mapping: `words` (int64) and the details bytes."""

    def __init__(self, fd: int):
        self.map = mmap.mmap(fd, CONTROL_BYTES)
        self.words = memoryview(self.map).cast("q")

    @classmethod
    def create(cls) -> tuple[Control, int]:
        fd = sealed_memfd("moe-ring", CONTROL_BYTES)
        return cls(fd), fd

    def details(self) -> str:
        n = min(max(self.words[DLEN], 0), DETAILS_BYTES)
        return self.map[_DETAILS_AT:_DETAILS_AT + n].decode("utf-8", "replace")

    def answer(self, code: int, details: str = "") -> None:
        data = details.encode()[:DETAILS_BYTES]
        self.map[_DETAILS_AT:_DETAILS_AT + len(data)] = data
        w = self.words
        w[CODE], w[DLEN] = code, len(data)
        w[RESP] = w[REQ]

    def post(self, seq: int, rows: int, segments) -> None:
        w = self.words
        flat = array.array("q", [v for seg in segments for v in seg])
        w[ROWS], w[NSEG] = rows, len(segments)
        w[SEG:SEG + len(flat)] = flat
        w[REQ] = seq

    def envelope(self) -> tuple[int, list[tuple[int, int, int]]]:
        """(rows, segments) as the client wrote them, copied out first and then checked (the
        client may rewrite the block meanwhile); raises ValueError naming the problem."""
        w = self.words
        rows, n = w[ROWS], w[NSEG]
        if not 0 <= n <= MAX_SEGMENTS:
            raise ValueError(f"segments must be at most {MAX_SEGMENTS} (layer, expert, rows) triples, got {n}")
        flat = w[SEG:SEG + 3 * n].tolist()
        if not all(0 <= v < 1 << 32 for v in [rows, *flat]):
            raise ValueError("rows and segments must be integers in [0, 2**32)")
        return rows, list(zip(flat[0::3], flat[1::3], flat[2::3]))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:  # the other side has gone
        pass


def drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def check_eventfd(fd: int) -> None:
    """A descriptor the replica may ring: an eventfd (anything else is refused)."""
    if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
        raise ValueError("a session's wake-up descriptors must be eventfds")
