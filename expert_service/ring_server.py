"""The replica's end of the same-node rings (moe_core/ring.py): one thread serves them all."""
from __future__ import annotations

import os
import select
import threading
import time

from moe_core.ring import INTERNAL, INVALID, REQ, Control, default_spin_s, drain, eventfd, ring


class _Served:
    def __init__(self, session: str, control: Control, wake: int, notify: int):
        self.session, self.control, self.wake, self.notify = session, control, wake, notify
        self.seen = control.words[REQ]
        self.last = time.monotonic()


class RingServer:
    """The replica's end: one thread serves the rings of all its sessions, in turn.

    `serve(session, rows, segments)` runs a call (on this thread); a ValueError (bad input)
    answers INVALID_ARGUMENT with its message, any other exception INTERNAL. `closed(session)`,
    when given, runs on this thread once a removed session will be served no more."""

    def __init__(self, serve, spin_s: float | None = None, setup=None, closed=None):
        self.serve, self.setup, self.closed = serve, setup, closed
        self.spin_s = default_spin_s() if spin_s is None else spin_s
        self._sessions: dict[str, _Served] = {}
        self._closing: list[_Served] = []
        self._changed = True  # the poll set must be rebuilt
        self._lock = threading.Lock()
        self._poke = eventfd()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="expert-ring", daemon=True)
        self._thread.start()

    def add(self, session: str, control_fd: int, wake_fd: int, notify_fd: int) -> None:
        """Takes the session's control block and duplicates of its two eventfds."""
        served = _Served(session, Control(control_fd), os.dup(wake_fd), os.dup(notify_fd))
        with self._lock:
            self._sessions[session] = served
            self._changed = True
        ring(self._poke)

    def remove(self, session: str) -> None:
        with self._lock:
            served = self._sessions.pop(session, None)
            if served is not None:
                self._closing.append(served)
                self._changed = True
        ring(self._poke)

    def last_call(self, session: str) -> float:
        served = self._sessions.get(session)
        return served.last if served is not None else 0.0

    def stop(self) -> None:
        self._stopped = True
        ring(self._poke)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        if self.setup is not None:
            self.setup()
        poller, idle_since = select.poll(), time.monotonic()
        while not self._stopped:
            with self._lock:
                sessions = list(self._sessions.values())
                closing, self._closing = self._closing, []
                changed, self._changed = self._changed, False
            if changed:  # before any descriptor below is closed
                poller = select.poll()
                for fd in [self._poke] + [s.wake for s in sessions]:
                    poller.register(fd, select.POLLIN)
            for served in closing:
                os.close(served.wake)
                os.close(served.notify)
                if self.closed is not None:
                    self.closed(served.session)
            busy = False
            for served in sessions:
                if served.control.words[REQ] != served.seen:
                    self._call(served)
                    busy = True
            now = time.monotonic()
            if busy:
                idle_since = now
                continue
            if now - idle_since < self.spin_s:
                os.sched_yield()
                continue
            for fd, _ in poller.poll(1000):
                drain(fd)
            idle_since = time.monotonic()

    def _call(self, served: _Served) -> None:
        c = served.control
        served.seen = c.words[REQ]
        served.last = time.monotonic()
        try:
            rows, segments = c.envelope()
            self.serve(served.session, rows, segments)
            c.answer(0)
        except ValueError as e:  # WireError is one
            c.answer(INVALID, str(e))
        except Exception as e:  # a fault of ours; the servicer has logged it
            c.answer(INTERNAL, f"expert compute failed: {type(e).__name__}")
        ring(served.notify)

