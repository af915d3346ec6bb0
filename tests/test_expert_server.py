"""ExpertService over real loopback sockets: answers equal expert_ffn, bad input is refused as
INVALID_ARGUMENT with a message naming the problem, and the standalone server starts and stops."""
import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expert_service.experts import ExpertShard, expert_ffn
from expert_service.server import ExpertServicer, start_server
from moe.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from moe_core import auth
from moe_core.checkpoint import Checkpoint, expert_keys, random_weights, write_checkpoint
from moe_core.codec import encode
from moe_core.config import preset
from router_service.channels.grpc_bytes import BytesChannel

CFG = preset("tiny")  # H=64, I=128, 2 layers, 8 experts
H = CFG.hidden_size
PAIRS = [(0, 0), (0, 1), (0, 3), (1, 5)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    state = random_weights(CFG, seed=1)
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, CFG, state)
    return path, state


def reference(state, x_TH, segments):
    """The slow, obviously-right answer: one expert_ffn call per segment, in float32."""
    out, start = [], 0
    for layer, expert, rows in segments:
        w = [state[k] for k in expert_keys(layer, expert)]
        out.append(expert_ffn(x_TH[start:start + rows].float(), *w))
        start += rows
    return torch.cat(out) if out else torch.zeros(0, H)


async def serving(model_dir, *, dtype=torch.float32, **kw):
    servicer = ExpertServicer(ExpertShard.load(Checkpoint(model_dir), PAIRS, dtype=dtype), **kw)
    server, port = await start_server(servicer)
    return servicer, server, f"127.0.0.1:{port}"


LAYOUTS = [
    [(0, 0, 5)],
    [(0, 0, 3), (0, 1, 4), (0, 3, 1)],
    [(0, 3, 2), (1, 5, 3), (0, 0, 4)],  # several layers, not in expert order
    [(0, 1, 0), (0, 0, 2), (0, 1, 0), (1, 5, 1)],  # empty groups
    [(0, 0, 2), (0, 0, 3)],  # one pair twice
    [(0, 1, 700), (1, 5, 300)],  # big enough to compute on the worker thread
    [],  # nothing routed here this step
]


def test_forward_equals_expert_ffn(model):
    path, state = model

    async def main():
        servicer, server, addr = await serving(path)
        async with BytesChannel(addr) as client:
            for segments in LAYOUTS:
                x = torch.randn(sum(n for *_, n in segments), H)
                y = await client.forward(x, segments, timeout=10)
                assert y.dtype == torch.float32 and y.shape == x.shape
                torch.testing.assert_close(y, reference(state, x, segments), rtol=1e-5, atol=1e-6)
            x = torch.randn(6, H)
            for wire in ("bfloat16", "float16"):  # request dtype in, same dtype out
                async with BytesChannel(addr, wire_dtype=wire) as narrow:
                    y = await narrow.forward(x, [(0, 3, 6)], timeout=10)
                torch.testing.assert_close(y, reference(state, x, [(0, 3, 6)]), rtol=2e-2, atol=2e-3)
            info = await client.info(timeout=5)
        await server.stop(None)
        assert [(k.layer, k.expert) for k in info.served] == PAIRS
        assert (info.hidden_size, info.dtype, info.device) == (H, "float32", "cpu")
        assert info.calls == len(LAYOUTS) + 2 and info.in_flight == 0
        assert info.rows == sum(n for seg in LAYOUTS for *_, n in seg) + 12

    asyncio.run(main())


def test_compute_dtype_and_reply_dtype(model):
    path, state = model

    async def main():
        _, server, addr = await serving(path, dtype=torch.bfloat16)
        x = torch.randn(4, H)
        async with BytesChannel(addr) as client:
            y = await client.forward(x, [(1, 5, 4)], timeout=10)
            info = await client.info(timeout=5)
        await server.stop(None)
        assert info.dtype == "bfloat16" and y.dtype == torch.float32
        torch.testing.assert_close(y, reference(state, x, [(1, 5, 4)]), rtol=5e-2, atol=5e-3)

    asyncio.run(main())


def request(dtype="float32", shape=(4, H), data=None, segments=((0, 0, 4),), fill=0.0):
    if data is None:  # well-formed bytes for the shape (float32 ones under a foreign dtype tag)
        data = encode(torch.full(shape, fill), dtype if dtype in ("bfloat16", "float16") else None).data
    return expert_pb2.ForwardRequest(
        hidden=common_pb2.Tensor(dtype=dtype, shape=list(shape), data=data),
        segments=[expert_pb2.Segment(layer=L, expert=E, rows=r) for L, E, r in segments])


BAD = [
    (expert_pb2.ForwardRequest(), "hidden tensor is missing"),
    (request(dtype="float64"), "hidden: dtype 'float64' is not accepted"),
    (request(dtype="int32"), "hidden: dtype 'int32' is not accepted"),
    (request(dtype="pickle"), "dtype 'pickle' is not accepted"),
    (request(data=bytes(4 * 4 * H - 1)), f"{4 * 4 * H - 1} data bytes do not match shape \\[4, {H}\\]"),
    (request(shape=(2**40, H), data=bytes(16)), "declares .* elements, limit is"),
    (request(shape=(2**31, 2**31, H), data=bytes(16)), "rank 2"),
    (request(shape=(-4, H), data=bytes(0)), "negative dimension"),
    (request(shape=(4 * H,)), "expected rank 2"),
    (request(shape=(4, H + 1)), f"last dimension must be {H}"),
    (request(segments=((0, 0, 3),)), "segments cover 3 rows, hidden has 4"),
    (request(segments=((0, 0, 4), (0, 1, 1))), "segments cover 5 rows, hidden has 4"),
    (request(segments=((0, 0, 2**32 - 1), (0, 1, 5))), "segments cover 4294967300 rows"),
    (request(segments=((0, 2, 4),)), "does not serve layer 0 expert 2"),
    (request(segments=((7, 0, 4),)), "does not serve layer 7 expert 0"),
    (request(segments=[(0, 0, 0)] * 5000), "more than 4099 fields"),  # counted on the wire, before parsing
    (request(fill=float("nan")), "hidden: 256 of 256 values are NaN or infinite"),
    (request(fill=float("inf"), dtype="bfloat16", shape=(4, H)), "NaN or infinite"),
]


def test_bad_requests_are_invalid_argument(model):
    path, _ = model

    async def main():
        servicer, server, addr = await serving(path)
        md = auth.call_metadata(servicer.key)
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            for req, match in BAD:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Forward(req, timeout=5, metadata=md)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert re.search(match, err.value.details()), err.value.details()
                assert "Traceback" not in err.value.details()
            raw = channel.unary_unary("/moe.v1.ExpertService/Forward", request_serializer=bytes,
                                      response_deserializer=bytes)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\x0a\xff\xff", timeout=5, metadata=md)  # not a protobuf at all
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid moe.v1.ForwardRequest" in err.value.details()
            ok = await stub.Forward(request(fill=0.5), timeout=5, metadata=md)  # still serving
            assert list(ok.output.shape) == [4, H]
        await server.stop(None)
        assert servicer.calls == 1 and servicer.in_flight == 0

    asyncio.run(main())


def test_health_and_in_flight_and_deadline(model):
    path, _ = model
    gate = threading.Event()

    async def main():
        servicer, server, addr = await serving(path, inline_below=0)  # every call on the worker
        real_forward = servicer.shard.forward
        servicer.shard.forward = lambda *a: (gate.wait(10), real_forward(*a))[1]
        async with grpc.aio.insecure_channel(addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "moe.v1.ExpertService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with BytesChannel(addr) as client:
                x = torch.randn(2, H)
                calls = [asyncio.create_task(client.forward(x, [(0, 0, 2)], timeout=10)) for _ in range(3)]
                for _ in range(500):  # one computing, two queued for the worker thread
                    if servicer.in_flight == 3:
                        break
                    await asyncio.sleep(0.01)
                assert (await client.info(timeout=5)).in_flight == 3
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.forward(x, [(0, 0, 2)], timeout=0.2)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                gate.set()
                for y in await asyncio.gather(*calls):
                    assert y.shape == (2, H)
        await server.stop(None)

    asyncio.run(main())


def test_standalone_server_starts_answers_and_stops(model):
    path, state = model
    proc = subprocess.Popen(
        [sys.executable, "-m", "expert_service", "--model", str(path), "--layers", "1", "--experts", "5,6"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "server printed nothing in 60 s"
        line = json.loads(proc.stdout.readline())
        assert line["pairs"] == 2 and line["port"] > 0

        async def call():
            async with BytesChannel(f"127.0.0.1:{line['port']}") as client:
                x = torch.randn(3, H)
                y = await client.forward(x, [(1, 6, 1), (1, 5, 2)], timeout=10)
            torch.testing.assert_close(y, reference(state, x, [(1, 6, 1), (1, 5, 2)]), rtol=1e-5, atol=1e-6)

        asyncio.run(call())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_standalone_server_refuses_bad_arguments(model):
    path, _ = model
    out = subprocess.run([sys.executable, "-m", "expert_service", "--model", str(path), "--experts", "8"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--experts '8': the model has experts 0..7" in out.stderr and "Traceback" not in out.stderr
