"""The same-node fast path: tensors through shared buffers, gRPC carrying only the envelope."""
import asyncio
import os
import threading

import grpc
import pytest
import torch

from expert_service import doorbell
from expert_service.experts import ExpertShard
from expert_service.server import ExpertServicer, start_server
from moe.v1 import expert_pb2, expert_pb2_grpc
from moe_core import auth, ring, shared
from router_service.channels import FALLBACKS
from router_service.channels.grpc_bytes import BytesChannel
from router_service.channels.session import Doorbell, SessionChannel
from tests.conftest import run


def _shard(H=32, I=48):
    g = torch.Generator().manual_seed(0)
    return ExpertShard({(0, e): tuple(torch.randn(*s, generator=g) / 8 for s in ((I, H), (H, I), (I, H)))
                        for e in range(3)})


def _ours():
    return {f for f in os.listdir("/dev/shm") if f.startswith("moe-")}


def test_shm_forward_equals_bytes_and_cleans_up():
    shard = _shard()
    before = _ours()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        plain, fast = BytesChannel(f"127.0.0.1:{port}"), SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            for T in (1, 5, 64, 65, 300, 7):  # grows the buffers, then reuses them
                x = torch.randn(T, 32)
                segs = [(0, 0, T // 3), (0, 2, T - T // 3)]
                a = await plain.forward(x, segs, timeout=10)
                b = await fast.forward(x, segs, timeout=10)
                assert torch.equal(a, b) and torch.equal(b, shard.forward(x, segs))
            assert fast.kind == "shm" and {b.kind for b in servicer.sessions.values()} == {"shm"}
            assert _ours() == before  # memfds: nothing with a name anywhere
            assert fast._free and all(not s.doorbell.closed for s in fast._free)
        finally:
            await fast.close()
            await plain.close()
            await server.stop(None)
        for _ in range(100):  # closing the client's connections detaches its sessions
            if not servicer.sessions:
                break
            await asyncio.sleep(0.02)
        return servicer
    servicer = run(go())
    assert not servicer.sessions and _ours() == before


def test_grpc_attach_and_session_forwards_are_refused():
    """No buffer is opened by a name a client supplies: sessions attach over the doorbell only."""
    async def go():
        servicer = ExpertServicer(_shard())
        server, port = await start_server(servicer)
        md = auth.call_metadata(servicer.key)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = expert_pb2_grpc.ExpertServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Attach(expert_pb2.AttachRequest(kind="shm", dtype="float32", capacity_rows=4,
                                                               hidden_size=32, names=["moe-1-" + "0" * 32] * 2),
                                      timeout=5, metadata=md)
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "doorbell" in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Forward(expert_pb2.ForwardRequest(session="nope", rows=1,
                                                                 segments=[expert_pb2.Segment(rows=1)]),
                                       timeout=5, metadata=md)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "doorbell" in e.value.details()
        finally:
            await server.stop(None)
            servicer.close()
    run(go())


async def _attached(servicer, capacity=8, hidden=32, key=None, buffers=None):
    """A raw shm session on its own doorbell connection, attached like the client does."""
    b = buffers or shared.create("shm", capacity, hidden, torch.float32)
    bell = await Doorbell.attach(servicer.doorbell.path, key or servicer.key, b, dtype="float32", timeout=5)
    b.close_fds()
    return b, bell


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_ring_answers_bad_calls_and_detaches_on_close():
    """Bad input in a call through the ring gets INVALID_ARGUMENT naming it, and the session stays
    usable; an envelope no client would write (too many segments, negative values) the same; a
    byte on the doorbell after the Attach, or closing it, ends the session."""
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        b, bell = await _attached(servicer)
        try:
            assert bell.session in servicer.sessions
            x = torch.randn(5, 32)
            b.x[:5] = x
            await bell.forward(5, [(0, 1, 5)], timeout=5)
            assert torch.equal(b.y[:5], shard.forward(x, [(0, 1, 5)]))
            for rows, segments, msg in [(9, [(0, 1, 9)], "exceed the session's 8"),
                                        (5, [(0, 7, 5)], "does not serve layer 0 expert 7"),
                                        (5, [(0, 1, 4)], "segments cover 4 rows"),
                                        (5, [(0, 1, -5)], "integers in [0, 2**32)"),
                                        (-1, [], "integers in [0, 2**32)")]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await bell.forward(rows, segments, timeout=5)
                assert e.value.code() == INVALID and msg in e.value.details(), (rows, segments, e.value.details())
            w = bell.control.words  # a count of segments past the limit, written by hand
            bell.seq += 1
            w[ring.NSEG], w[ring.REQ] = ring.MAX_SEGMENTS + 1, bell.seq
            ring.ring(bell.wake)
            await bell._answer(5)
            assert w[ring.CODE] == INVALID.value[0] and "at most 4096" in bell.control.details()
            b.x[0, 0] = float("nan")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await bell.forward(5, [(0, 1, 5)], timeout=5)
            assert e.value.code() == INVALID and "NaN or infinite" in e.value.details()
            assert servicer.calls == 1 and not bell.closed
            # Anything written to the doorbell after the Attach closes the session.
            b2, bell2 = await _attached(servicer)
            bell2.writer.write(b"\0")
            assert await asyncio.wait_for(bell2._gone, 5) == b""
            bell2.close()
            assert bell.session in servicer.sessions
            bell.close()  # the session's own connection: closing it detaches the session
            for _ in range(100):
                if bell.session not in servicer.sessions:
                    break
                await asyncio.sleep(0.02)
            assert bell.session not in servicer.sessions
        finally:
            await server.stop(None)
            servicer.close()
    run(go())


@pytest.mark.parametrize("reachable", [True, False])
def test_a_cancelled_call_drops_its_session_and_an_unreachable_doorbell_falls_back_to_bytes(reachable):
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        if not reachable:
            servicer.doorbell.path = "\0moe-doorbell-nobody-listens"
            before = dict(FALLBACKS)
        client = SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            x = torch.randn(6, 32)
            assert torch.equal(await client.forward(x, [(0, 2, 6)], timeout=10), shard.forward(x, [(0, 2, 6)]))
            if not reachable:  # bytes for good, logged once and counted
                assert client.kind is None and not client._free
                assert FALLBACKS["unreachable"] == before.get("unreachable", 0) + 1
                return
            assert client.kind == "shm" and len(client._free) == 1
            stale = client._free[0]
            slow, release = servicer.ring.serve, threading.Event()

            def held(*args):  # the replica is still computing when the caller gives up
                release.wait(10)
                return slow(*args)
            servicer.ring.serve = held
            task = asyncio.ensure_future(client.forward(x, [(0, 2, 6)], timeout=10))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            servicer.ring.serve = slow
            release.set()
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
        client = SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            x = torch.randn(5, 32)
            assert torch.equal(await client.forward(x, [(0, 1, 5)], timeout=10), shard.forward(x, [(0, 1, 5)]))
            assert len(client._free) == 1
        finally:
            await client.close()
            await server.stop(None)
            servicer.close()
    uvloop.run(go())


@pytest.mark.parametrize("alive", [True, False])
def test_a_silent_doorbell_call_probes_the_replica(alive, monkeypatch):
    """No reply on the doorbell: a replica that still answers Info is busy and the call waits for
    its deadline; one that does not is gone and the call fails UNAVAILABLE, in seconds."""
    monkeypatch.setattr(Doorbell, "probe_after_s", 0.2)
    monkeypatch.setattr(Doorbell, "probe_timeout_s", 0.3)
    shard = _shard()

    async def go():
        servicer = ExpertServicer(shard)
        probes, info, wedge, release = [], servicer.Info, asyncio.Event(), threading.Event()

        async def probed(request, context):  # start_server binds the servicer's methods: wrap first
            if wedge.is_set():
                probes.append(1)
                if not alive:
                    await asyncio.Event().wait()
            return await info(request, context)
        servicer.Info = probed
        server, port = await start_server(servicer)
        client = SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            x = torch.randn(4, 32)
            assert torch.equal(await client.forward(x, [(0, 0, 4)], timeout=10), shard.forward(x, [(0, 0, 4)]))

            servicer.ring.serve = lambda *args: release.wait()  # the ring thread: no answer
            wedge.set()
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.forward(x, [(0, 0, 4)], timeout=1.5)
            return e.value, asyncio.get_running_loop().time() - started, len(probes)
        finally:
            release.set()
            await client.close()
            await server.stop(None)
            servicer.close()
    error, seconds, probes = run(go())
    if alive:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 1.4 < seconds < 3 and probes >= 3
    else:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stopped answering" in error.details()
        assert seconds < 1.2 and probes == 1
