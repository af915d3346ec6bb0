"""Question: how fast does a tensor cross the wire, and what does the HTTP/2 tuning buy?

A float32 [rows, 4096] tensor makes a round trip to an echo server in another process, over
grpc.aio on 127.0.0.1, at 128 KB to 64 MB. Three paths, each with the tuned channel options
(`moe_core.grpc_options.channel_options`, both ends) and with gRPC's defaults (only the
message-size limits raised, or nothing above 4 MB would pass):

- `codec`: client encode -> Tensor protobuf -> gRPC -> server decode + encode -> gRPC -> client
  decode: everything an expert call does except the math. encode/decode ms are the client's;
  rpc ms holds the rest (both transfers and the server's decode + encode).
- `frame`: the same round trip as ForwardFrame makes it (moe_core/tensor_frame.py): client
  encode_request -> raw bytes frame -> gRPC -> server decode_request (with its finite check) +
  encode_reply -> gRPC -> client decode_reply.
- `wire`: the serialized bytes echoed as they are (no protobuf, no codec on either side): the
  transport alone.

GB/s each way = payload bytes / (round trip / 2). A second table times each step of the codec
path in this process, next to a memcpy into a preallocated buffer ("copy-equivalents").

Copies of the payload per direction, read from the code path (grpcio 1.85's Cython layer, upb
protobuf) and borne out by the step timings: `codec` 9 in user space + 2 in the kernel:
encode: numpy tobytes 1, protobuf field set (upb copies into its arena) 1; SerializeToString:
upb encode 1, into Python bytes 1; grpc send: slice from a copied buffer 1; kernel send + receive
2; grpc receive: one bytes per slice, then joined 2 (1 when the message arrives in one slice);
FromString (upb parses without aliasing) 1; decode: `.data` makes a fresh bytes 1,
torch.frombuffer 0. `frame` 4 in user space + 2 in the kernel: encode: header and payload joined
into one bytes 1 (the tensor's bytes are viewed, not copied, before that); the 3 grpc copies;
decode: a memoryview of the received bytes, torch.frombuffer 0. `wire`: the 3 grpc copies + 2 in
the kernel.

`--malloc heap` (the default, as in the services) keeps large buffers in glibc's heap in both processes (moe_core.codec.
keep_large_buffers): without it every copy above 32 MB lands in fresh, page-faulting memory.

    python -m benchmarks.codec [--sizes 128KB,1MB,4MB,16MB,64MB] [--iters N] [--options tuned,default]
                               [--malloc default|heap] [--name codec__VARIANT --note TEXT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import iters_for, keep_large_buffers, run, save
from moe.v1 import common_pb2
from moe_core.checkpoint import parse_size
from moe_core.codec import decode, encode
from moe_core.grpc_options import channel_options
from moe_core.tensor_frame import decode_reply, decode_request, encode_reply, encode_request

HIDDEN = 4096
SERVICE = "moe.bench.Echo"
COPIES = {"codec": 9, "frame": 4, "wire": 3}  # user-space copies per direction, see the module docstring
KERNEL_COPIES = 2
MAX_ELEMENTS = 1 << 26  # the echo server's limit: 256 MB of float32


def options(kind: str) -> list[tuple[str, int]]:
    tuned = channel_options()
    if kind == "tuned":
        return tuned
    if kind == "default":
        return [(k, v) for k, v in tuned if k.startswith("grpc.max_")]
    raise ValueError(f"options must be 'tuned' or 'default', got {kind!r}")


# ---- the echo server (a separate process: `python -m benchmarks.codec --serve`) ----

async def _serve() -> None:
    import grpc

    async def echo_bytes(data: bytes, context) -> bytes:
        return data

    async def echo_tensor(msg: common_pb2.Tensor, context) -> common_pb2.Tensor:
        t0 = time.perf_counter()
        out = encode(decode(msg, name="echo"))
        context.set_trailing_metadata((("server-us", str(int((time.perf_counter() - t0) * 1e6))),))
        return out

    async def echo_frame(data: bytes, context) -> bytes:
        t0 = time.perf_counter()
        x, _ = decode_request(data, hidden=HIDDEN, max_elements=MAX_ELEMENTS, max_segments=1)
        out = encode_reply(x)
        context.set_trailing_metadata((("server-us", str(int((time.perf_counter() - t0) * 1e6))),))
        return out

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Bytes": grpc.unary_unary_rpc_method_handler(echo_bytes),
        "Frame": grpc.unary_unary_rpc_method_handler(echo_frame),
        "Tensor": grpc.unary_unary_rpc_method_handler(
            echo_tensor, request_deserializer=common_pb2.Tensor.FromString,
            response_serializer=common_pb2.Tensor.SerializeToString)})
    servers, ports = [], {}
    for kind in ("tuned", "default"):
        server = grpc.aio.server(options=options(kind))
        server.add_generic_rpc_handlers((handlers,))
        ports[kind] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(json.dumps(ports), flush=True)
    await stop.wait()
    for server in servers:
        await server.stop(0)


class EchoServer:
    """The echo server subprocess; a context manager that stops it."""

    def __init__(self, malloc: str = "default"):
        self.malloc = malloc

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.codec", "--serve", "--malloc", self.malloc],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("codec echo server did not start")
        self.ports = json.loads(line)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- the client ----

async def _bench_size(ch, x: torch.Tensor, iters: int | None) -> list[dict]:
    call_tensor = ch.unary_unary(f"/{SERVICE}/Tensor", request_serializer=common_pb2.Tensor.SerializeToString,
                                 response_deserializer=common_pb2.Tensor.FromString)
    call_bytes = ch.unary_unary(f"/{SERVICE}/Bytes")
    call_frame = ch.unary_unary(f"/{SERVICE}/Frame")

    async def codec_once():
        t0 = time.perf_counter()
        msg = encode(x)
        t1 = time.perf_counter()
        call = call_tensor(msg, timeout=120)
        reply = await call
        t2 = time.perf_counter()
        y = decode(reply)
        t3 = time.perf_counter()
        server_us = dict(await call.trailing_metadata()).get("server-us", "0")
        return y, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, int(server_us) / 1e3)

    async def frame_once():
        t0 = time.perf_counter()
        data = encode_request(x, [(0, 0, x.shape[0])])
        t1 = time.perf_counter()
        call = call_frame(data, timeout=120)
        reply = await call
        t2 = time.perf_counter()
        y = decode_reply(reply, rows=x.shape[0], hidden=HIDDEN, max_elements=MAX_ELEMENTS, dtype=x.dtype)
        t3 = time.perf_counter()
        server_us = dict(await call.trailing_metadata()).get("server-us", "0")
        return y, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, int(server_us) / 1e3)

    payload = encode(x).SerializeToString()

    async def wire_once():
        t0 = time.perf_counter()
        back = await call_bytes(payload, timeout=120)
        if len(back) != len(payload):
            raise AssertionError(f"echo returned {len(back)} of {len(payload)} bytes")
        return (time.perf_counter() - t0) * 1e3

    y, first = await codec_once()
    if not torch.equal(y, x):
        raise AssertionError("the echoed tensor differs from the one sent")
    n = iters or iters_for(sum(first[:3]))
    codec = [(await codec_once())[1] for _ in range(n)]
    y, _ = await frame_once()
    if not torch.equal(y, x):
        raise AssertionError("the echoed frame's tensor differs from the one sent")
    frame = [(await frame_once())[1] for _ in range(n)]
    await wire_once()
    wire = [await wire_once() for _ in range(n)]

    nbytes = x.numel() * x.element_size()

    def row(path, times):
        enc, rpc, dec, srv = (statistics.median([c[i] for c in times]) for i in range(4))
        rtt = statistics.median([sum(c[:3]) for c in times])
        return {"path": path, "encode_ms": enc, "rpc_ms": rpc, "server_ms": srv, "decode_ms": dec, "rtt_ms": rtt,
                "GBps_each_way": nbytes / (rtt / 2 * 1e-3) / 1e9, "copies_each_way": COPIES[path], "iters": n}

    wire_rtt = statistics.median(wire)
    return [
        row("codec", codec),
        row("frame", frame),
        {"path": "wire", "rpc_ms": wire_rtt, "rtt_ms": wire_rtt,
         "GBps_each_way": nbytes / (wire_rtt / 2 * 1e-3) / 1e9, "copies_each_way": COPIES["wire"], "iters": n},
    ]


async def _bench(sizes: list[int], kinds: list[str], iters: int | None, malloc: str) -> list[dict]:
    import grpc

    rows = []
    with EchoServer(malloc) as server:
        for kind in kinds:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[kind]}", options=options(kind)) as ch:
                for size in sizes:
                    x = torch.randn(max(1, size // (HIDDEN * 4)), HIDDEN, generator=torch.Generator().manual_seed(size))
                    for r in await _bench_size(ch, x, iters):
                        rows.append({"MB": x.numel() * 4 / 2**20, "rows": x.shape[0], "options": kind, **r})
                        print(rows[-1], flush=True)
    return sorted(rows, key=lambda r: (r["MB"], r["path"], kinds.index(r["options"])))


def steps(sizes: list[int], iters: int = 5) -> list[dict]:
    """Each step of the codec path alone (best of `iters`), in ms and in memcpy-equivalents."""
    def best(fn):
        out, times = None, []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return min(times), out

    rows = []
    for size in sizes:
        x = torch.randn(max(1, size // (HIDDEN * 4)), HIDDEN)
        nbytes = x.numel() * 4
        src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        memcpy, _ = best(lambda: np.copyto(dst, src))
        arr = x.numpy()
        r = {"MB": nbytes / 2**20, "memcpy_ms": memcpy}
        r["tobytes_ms"], data = best(arr.tobytes)
        r["pb_field_ms"], msg = best(lambda: common_pb2.Tensor(dtype="float32", shape=x.shape, data=data))
        r["serialize_ms"], wire = best(msg.SerializeToString)
        r["parse_ms"], back = best(lambda: common_pb2.Tensor.FromString(wire))
        r["decode_ms"], _ = best(lambda: decode(back))  # the .data copy; the view itself is free
        r["copy_equivalents"] = sum(v for k, v in r.items() if k.endswith("_ms") and k != "memcpy_ms") / memcpy
        rows.append(r)
    return rows


STEP_COLUMNS = ["MB", "memcpy_ms", "tobytes_ms", "pb_field_ms", "serialize_ms", "parse_ms", "decode_ms",
                "copy_equivalents"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128KB,1MB,4MB,16MB,64MB")
    p.add_argument("--options", default="tuned,default", help="channel options to compare: tuned, default")
    p.add_argument("--iters", type=int, help="round trips per point (default: about 3 s worth)")
    p.add_argument("--name", default="codec", help="results file name (codec__VARIANT for a variant)")
    p.add_argument("--note", help="what this variant changes (shown in the report)")
    p.add_argument("--malloc", default="heap", choices=["default", "heap"],
                   help="heap (what the services do): keep large buffers in glibc's heap, see "
                        "moe_core.codec.keep_large_buffers; default: glibc's own thresholds")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.malloc == "heap" and not keep_large_buffers():
        raise SystemExit("--malloc heap needs glibc")
    if a.serve:
        return asyncio.run(_serve())
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    kinds = a.options.split(",")
    for k in kinds:
        options(k)  # a typo fails before the server starts
    rows = run(_bench(sizes, kinds, a.iters, a.malloc))
    meta = {"hidden": HIDDEN, "dtype": "float32", "malloc": a.malloc, "kernel_copies_each_way": KERNEL_COPIES,
            "note": a.note,
            "tables": [{"title": "Codec steps in one process (best of 5): ms, and their sum in memcpy-equivalents",
                        "columns": STEP_COLUMNS, "rows": steps(sizes)}]}
    save(a.name, rows, meta, ["MB", "options", "path", "encode_ms", "rpc_ms", "server_ms", "decode_ms", "rtt_ms",
                              "GBps_each_way", "copies_each_way"])


if __name__ == "__main__":
    main()
