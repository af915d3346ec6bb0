"""Routing traces: a msgpack stream of per-step, per-layer expert token counts, recorded from a
running gateway (`moe-serve record`) or made up (`moe-serve simulate --zipf`), replayed by
`moe-serve simulate`.

File layout: one header map, then one map per step.
    {"format": "moe-serve-trace", "version": 1, "n_layers": L, "n_experts": E, "top_k": k, "source": ...}
    {"t": seconds since start, "tokens": tokens that went through the model, "counts": [[E ints] * L]}
A recorded step is one poll of the gateway's Stats: the counts are what was routed since the last poll.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

FORMAT = "moe-serve-trace"
VERSION = 1


class TraceError(ValueError):
    """A file that is not a usable routing trace; the message says what is wrong and where."""


@dataclass
class Trace:
    n_layers: int
    n_experts: int
    top_k: int
    counts: np.ndarray                      # [S, L, E] tokens routed per step, layer, expert
    tokens: np.ndarray                      # [S] tokens through the model per step
    t: np.ndarray                           # [S] seconds since the start
    meta: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.counts)


def write_trace(path: str | Path, trace: Trace) -> Path:
    path = Path(path)
    with path.open("wb") as f, TraceWriter(f, trace.n_layers, trace.n_experts, trace.top_k, **trace.meta) as w:
        for counts, tokens, t in zip(trace.counts, trace.tokens, trace.t):
            w.step(counts, int(tokens), float(t))
    return path


class TraceWriter:
    """Appends steps to an open binary file; each step is flushed, so a killed recording stays readable."""

    def __init__(self, f, n_layers: int, n_experts: int, top_k: int, **meta):
        self.f, self.shape = f, (n_layers, n_experts)
        self.packer = msgpack.Packer()
        header = {"format": FORMAT, "version": VERSION, "n_layers": n_layers, "n_experts": n_experts,
                  "top_k": top_k, **meta}
        f.write(self.packer.pack(header))
        self.steps = 0

    def step(self, counts, tokens: int, t: float) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != self.shape:
            raise ValueError(f"step counts have shape {counts.shape}, the trace {self.shape}")
        self.f.write(self.packer.pack({"t": t, "tokens": tokens, "counts": counts.tolist()}))
        self.f.flush()
        self.steps += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.flush()


def read_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path} not found")
    with path.open("rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=1 << 30)
        try:
            header = next(unpacker)
        except StopIteration:
            raise TraceError(f"{path} is empty, not a routing trace") from None
        except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError) as e:
            raise TraceError(f"{path} is not a msgpack routing trace ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise TraceError(f"{path} is not a routing trace: its first record is not a {FORMAT!r} header")
        if header.get("version") != VERSION:
            raise TraceError(f"{path}: trace version {header.get('version')!r} is not supported (want {VERSION})")
        try:
            L, E, k = (int(header[key]) for key in ("n_layers", "n_experts", "top_k"))
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{path}: header lacks integer n_layers, n_experts and top_k") from None
        if min(L, E, k) <= 0 or k > E:
            raise TraceError(f"{path}: header has impossible shape n_layers={L} n_experts={E} top_k={k}")
        counts, tokens, ts = [], [], []
        try:
            for i, rec in enumerate(unpacker, start=1):
                c = np.asarray(rec["counts"], dtype=np.int64) if isinstance(rec, dict) else None
                if c is None or c.shape != (L, E):
                    raise TraceError(f"{path}: step {i} has no counts of shape [{L}, {E}]")
                if (c < 0).any():
                    raise TraceError(f"{path}: step {i} has negative counts")
                counts.append(c)
                tokens.append(int(rec.get("tokens", 0)))
                ts.append(float(rec.get("t", i)))
        except TraceError:
            raise
        except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
            raise TraceError(f"{path}: step {len(counts) + 1} is damaged ({e})") from None
        try:
            unpacker.read_bytes(1)  # msgpack refuses while it holds the start of an unfinished record
        except ValueError:
            raise TraceError(f"{path} ends inside step {len(counts) + 1}: the file is truncated") from None
    meta = {k: v for k, v in header.items() if k not in ("format", "version", "n_layers", "n_experts", "top_k")}
    shape = (len(counts), L, E)
    return Trace(L, E, k, np.stack(counts) if counts else np.zeros(shape, np.int64), np.asarray(tokens, np.int64),
                 np.asarray(ts, np.float64), meta)


def record(address: str, out: str | Path, *, interval_s: float = 1.0, duration_s: float = 60.0,
           timeout_s: float = 10.0) -> dict:
    """Polls the gateway's Stats every interval for duration and writes what was routed in between."""
    from moe_serve.client import stats

    def snapshot():
        r = stats(address, timeout=timeout_s)
        return r, np.array([list(layer.tokens_per_expert) for layer in r.layers], dtype=np.int64)

    first, last = snapshot()
    last_tokens, start = first.tokens_processed, time.monotonic()
    L, E = last.shape
    routed = 0
    with Path(out).open("wb") as f, TraceWriter(f, L, E, first.top_k, source="record", address=address,
                                                interval_s=interval_s) as w:
        while time.monotonic() - start < duration_s:
            time.sleep(interval_s)
            r, now = snapshot()
            delta = now - last
            if (delta < 0).any():  # the router restarted: its counters began again at zero
                delta = now
            w.step(delta, max(r.tokens_processed - last_tokens, 0), time.monotonic() - start)
            routed += int(delta.sum())
            last, last_tokens = now, r.tokens_processed
    return {"out": str(out), "steps": w.steps, "routed": routed, "n_layers": L, "n_experts": E}
