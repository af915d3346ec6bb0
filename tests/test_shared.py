"""The same-node fast path: tensors through shared buffers, gRPC carrying only the envelope."""
import asyncio
import os

import grpc
import msgpack
import pytest
import torch

from expert_service import doorbell, shared
from expert_service.client import ExpertClient
from expert_service.experts import ExpertShard
from expert_service.server import ExpertServicer, start_server
from moe.v1 import expert_pb2, expert_pb2_grpc
from tests.conftest import run


def _shard(H=32, I=48):
    g = torch.Generator().manual_seed(0)
    return ExpertShard({(0, e): tuple(torch.randn(*s, generator=g) / 8 for s in ((I, H), (H, I), (I, H)))
                        for e in range(3)})


def _ours():
    return {f for f in os.listdir(shared.SHM_DIR) if f.startswith("moe-")}


def test_shm_forward_equals_bytes_and_cleans_up():
    shard = _shard()
    before = _ours()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        plain, fast = ExpertClient(f"127.0.0.1:{port}"), ExpertClient(f"127.0.0.1:{port}", shared="shm")
        try:
            for T in (1, 5, 64, 65, 300, 7):  # grows the buffers, then reuses them
                x = torch.randn(T, 32)
                segs = [(0, 0, T // 3), (0, 2, T - T // 3)]
                a = await plain.forward(x, segs, timeout=10)
                b = await fast.forward(x, segs, timeout=10)
                assert torch.equal(a, b) and torch.equal(b, shard.forward(x, segs))
            assert fast.shared == "shm" and {b.kind for b in servicer.sessions.values()} == {"shm"}
            assert _ours() == before  # mapped by both sides, the files were unlinked at once
            assert all(s.doorbell is not None for s in fast._free)  # the envelope took the doorbell
        finally:
            await fast.close()
            await plain.close()
            await server.stop(None)
        return servicer
    servicer = run(go())
    assert not servicer.sessions and _ours() == before


@pytest.mark.parametrize("names,msg", [
    (["../../etc/passwd", "moe-1-" + "0" * 32], "not one this service created"),
    (["moe-1-" + "a" * 32, "moe-1-" + "b" * 32], "missing"),
])
def test_attach_refuses_bad_segments(names, msg):
    async def go():
        server, port = await start_server(ExpertServicer(_shard()))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = expert_pb2_grpc.ExpertServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Attach(expert_pb2.AttachRequest(kind="shm", dtype="float32", capacity_rows=4,
                                                               hidden_size=32, names=names), timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Forward(expert_pb2.ForwardRequest(session="nope", rows=1,
                                                                 segments=[expert_pb2.Segment(rows=1)]), timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown session" in e.value.details()
        finally:
            await server.stop(None)
    run(go())


async def _attached(port):
    """A raw shm session and its doorbell name, attached through gRPC like the client does."""
    b = shared.create("shm", 8, 32, torch.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await expert_pb2_grpc.ExpertServiceStub(ch).Attach(expert_pb2.AttachRequest(
            kind="shm", dtype="float32", capacity_rows=8, hidden_size=32, names=list(b.names)), timeout=5)
    return b, reply


async def _call(reader, writer, frame: bytes):
    writer.write(frame)
    return await asyncio.wait_for(doorbell.read_frame(reader), 5)


INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_doorbell_answers_bad_frames_and_detaches_on_close():
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        b, reply = await _attached(port)
        try:
            assert reply.doorbell and reply.session in servicer.sessions
            reader, writer = await asyncio.open_unix_connection(reply.doorbell)
            x = torch.randn(5, 32)
            b.x[:5] = x
            ok = doorbell.pack([reply.session, 5, [0, 1, 5]])
            assert await _call(reader, writer, ok) == [0, ""]
            assert torch.equal(b.y[:5], shard.forward(x, [(0, 1, 5)]))
            # Bad input in a well-formed frame: a named error, and the connection stays usable.
            for frame, msg in [([reply.session, 9, [0, 1, 9]], "exceed the session's 8"),
                               ([reply.session, 5, [0, 7, 5]], "does not serve layer 0 expert 7"),
                               ([reply.session, 5, [0, 1, 4]], "segments cover 4 rows")]:
                code, details = await _call(reader, writer, doorbell.pack(frame))
                assert code == INVALID and msg in details, (frame, details)
            b.x[0, 0] = float("nan")
            code, details = await _call(reader, writer, ok)
            assert code == INVALID and "NaN or infinite" in details
            assert servicer.calls == 1
            r1, w1 = await asyncio.open_unix_connection(reply.doorbell)
            code, details = await _call(r1, w1, doorbell.pack(["nope", 1, [0, 0, 1]]))
            assert code == INVALID and "unknown session" in details
            w1.close()
            # A frame that is not [session, rows, segments]: named, then the connection is closed.
            for frame in [msgpack.packb({"a": 1}), b"\xc1", msgpack.packb([reply.session, -1, []]),
                          msgpack.packb([reply.session, 1, [0, 0]])]:
                r2, w2 = await asyncio.open_unix_connection(reply.doorbell)
                code, details = await _call(r2, w2, doorbell._LEN.pack(len(frame)) + frame)
                assert code == INVALID and details
                assert await r2.read() == b""
                w2.close()
            r3, w3 = await asyncio.open_unix_connection(reply.doorbell)  # a frame too large to read
            w3.write(doorbell._LEN.pack(doorbell.MAX_FRAME + 1))
            code, details = await asyncio.wait_for(doorbell.read_frame(r3), 5)
            assert code == INVALID and "exceeds" in details
            w3.close()
            assert reply.session in servicer.sessions
            writer.close()  # the session's own connection: closing it detaches the session
            for _ in range(100):
                if reply.session not in servicer.sessions:
                    break
                await asyncio.sleep(0.02)
            assert reply.session not in servicer.sessions
        finally:
            b.unlink()
            await server.stop(None)
            servicer.close()
    run(go())


def test_doorbell_refuses_a_second_session_on_one_connection():
    async def go():
        servicer = ExpertServicer(_shard())
        server, port = await start_server(servicer)
        (b1, r1), (b2, r2) = await _attached(port), await _attached(port)
        try:
            reader, writer = await asyncio.open_unix_connection(r1.doorbell)
            assert (await _call(reader, writer, doorbell.pack([r1.session, 1, [0, 0, 1]])))[0] == 0
            code, details = await _call(reader, writer, doorbell.pack([r2.session, 1, [0, 0, 1]]))
            assert code == INVALID and "one session" in details
            writer.close()
        finally:
            b1.unlink()
            b2.unlink()
            await server.stop(None)
            servicer.close()
    run(go())


@pytest.mark.parametrize("reachable", [True, False])
def test_a_cancelled_call_drops_its_session_and_an_unreachable_doorbell_falls_back_to_grpc(reachable):
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        if not reachable:
            servicer.doorbell.path = "\0moe-doorbell-nobody-listens"
        client = ExpertClient(f"127.0.0.1:{port}", shared="shm")
        try:
            x = torch.randn(6, 32)
            assert torch.equal(await client.forward(x, [(0, 2, 6)], timeout=10), shard.forward(x, [(0, 2, 6)]))
            assert client.shared == "shm" and [s.doorbell is not None for s in client._free] == [reachable]
            stale = client._free[0]
            slow = servicer._run

            async def held(*args):  # the replica is still computing when the caller gives up
                await asyncio.sleep(0.3)
                return await slow(*args)
            servicer._run = held
            task = asyncio.ensure_future(client.forward(x, [(0, 2, 6)], timeout=10))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            servicer._run = slow
            assert stale not in client._free  # its buffers may still be written: never reused
            for _ in range(100):
                if stale.id not in servicer.sessions:
                    break
                await asyncio.sleep(0.02)
            assert stale.id not in servicer.sessions
            assert torch.equal(await client.forward(x, [(0, 1, 6)], timeout=10), shard.forward(x, [(0, 1, 6)]))
        finally:
            await client.close()
            await server.stop(None)
            servicer.close()
    run(go())


def test_doorbell_works_under_uvloop():
    """Ray Serve runs replicas, the router among them, on uvloop, whose own Unix-socket calls refuse
    abstract names (EINVAL): the doorbell makes its sockets itself."""
    import uvloop
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        client = ExpertClient(f"127.0.0.1:{port}", shared="shm")
        try:
            x = torch.randn(5, 32)
            assert torch.equal(await client.forward(x, [(0, 1, 5)], timeout=10), shard.forward(x, [(0, 1, 5)]))
            assert [s.doorbell is not None for s in client._free] == [True]
        finally:
            await client.close()
            await server.stop(None)
            servicer.close()
    uvloop.run(go())


@pytest.mark.parametrize("alive", [True, False])
def test_a_silent_doorbell_call_probes_the_replica(alive, monkeypatch):
    """No reply on the doorbell: a replica that still answers Info is busy and the call waits for
    its deadline; one that does not is gone and the call fails UNAVAILABLE, in seconds."""
    monkeypatch.setattr(doorbell.Doorbell, "probe_after_s", 0.2)
    monkeypatch.setattr(doorbell.Doorbell, "probe_timeout_s", 0.3)
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        probes, info, wedge = [], servicer.Info, asyncio.Event()

        async def probed(request, context):  # start_server binds the servicer's methods: wrap first
            if wedge.is_set():
                probes.append(1)
                if not alive:
                    await asyncio.Event().wait()
            return await info(request, context)
        servicer.Info = probed
        server, port = await start_server(servicer)
        client = ExpertClient(f"127.0.0.1:{port}", shared="shm")
        try:
            x = torch.randn(4, 32)
            assert torch.equal(await client.forward(x, [(0, 0, 4)], timeout=10), shard.forward(x, [(0, 0, 4)]))

            async def wedged(*args):
                await asyncio.Event().wait()
            servicer._run = wedged
            wedge.set()
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.forward(x, [(0, 0, 4)], timeout=1.5)
            return e.value, asyncio.get_running_loop().time() - started, len(probes)
        finally:
            await client.close()
            await server.stop(None)
            servicer.close()
    error, seconds, probes = run(go())
    if alive:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 1.4 < seconds < 3 and probes >= 3
    else:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stopped answering" in error.details()
        assert seconds < 1.2 and probes == 1


def test_sweep_unlinks_only_the_files_of_processes_that_are_gone():
    import subprocess
    import sys
    import uuid
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {"dead": f"moe-{int(gone.stdout)}-{uuid.uuid4().hex}", "ours": f"moe-{os.getpid()}-{uuid.uuid4().hex}",
             "other": f"moe-x-{uuid.uuid4().hex}"}
    for n in names.values():
        open(os.path.join(shared.SHM_DIR, n), "wb").close()
    try:
        shared.sweep()
        left = set(os.listdir(shared.SHM_DIR))
        assert names["dead"] not in left and {names["ours"], names["other"]} <= left
    finally:
        for n in names.values():
            if os.path.exists(os.path.join(shared.SHM_DIR, n)):
                os.unlink(os.path.join(shared.SHM_DIR, n))
