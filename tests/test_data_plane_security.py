"""Attacks on the expert data plane from other processes on this machine, at a real
`python -m expert_service` process: each is answered with the right status within a second, the
server's memory grows by less than 100 MB, and a router-side client keeps getting right answers."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import grpc
import msgpack
import pytest
import torch

from expert_service import doorbell
from expert_service.experts import ExpertShard
from moe.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from moe_core import auth, doorbell_wire, ring, shared
from moe_core.checkpoint import Checkpoint, random_weights, write_checkpoint
from moe_core.config import preset
from router_service.channels import FALLBACKS
from router_service.channels.grpc_bytes import BytesChannel
from router_service.channels.session import Doorbell, SessionChannel

CFG = preset("tiny")
H = CFG.hidden_size
KEY_ENV = {auth.KEY_ENV: "test-deployment-secret"}
UNAUTH, INVALID, EXHAUSTED = (c.value[0] for c in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                                                   grpc.StatusCode.RESOURCE_EXHAUSTED))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, CFG, random_weights(CFG, seed=3))
    env = dict(os.environ, **KEY_ENV)
    p = subprocess.Popen([sys.executable, "-m", "expert_service", "--model", str(path), "--experts", "0,1",
                          "--layers", "0", "--threads", "1"], stdout=subprocess.PIPE, text=True, env=env)
    info = json.loads(p.stdout.readline())
    shard = ExpertShard.load(Checkpoint(path), [(0, 0), (0, 1)])
    yield p, f"127.0.0.1:{info['port']}", shard
    p.terminate()
    p.wait(10)


@pytest.fixture
def key(monkeypatch):
    for k, v in KEY_ENV.items():
        monkeypatch.setenv(k, v)
    return auth.data_key()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def answers_right(address, shard, kind=None):
    """A router-side channel's call (bytes, or a same-node session of `kind`), checked against the
    shard computed here."""
    client = SessionChannel(address, kind) if kind else BytesChannel(address)
    x = torch.randn(5, H)
    y = await client.forward(x, [(0, 0, 2), (0, 1, 3)], timeout=10)
    assert torch.equal(y, shard.forward(x, [(0, 0, 2), (0, 1, 3)]))
    return client


def timed_error(coro_fn):
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(coro_fn())
    return e.value, time.monotonic() - started


def test_calls_without_the_key_are_unauthenticated(server, key):
    p, address, shard = server
    before = rss_mb(p.pid)
    for metadata in [(), ((auth.METADATA_KEY, "0" * 64),), ((auth.METADATA_KEY, key[:-1]),)]:
        for method, request in [("Info", expert_pb2.InfoRequest()),
                                ("Forward", expert_pb2.ForwardRequest(segments=[expert_pb2.Segment(rows=1)]))]:
            async def call():
                async with grpc.aio.insecure_channel(address) as ch:
                    await getattr(expert_pb2_grpc.ExpertServiceStub(ch), method)(request, metadata=metadata, timeout=5)
            err, seconds = timed_error(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "credential" in err.details()
            assert seconds < 1
    # the doorbell: found through an authenticated Info only, and it wants the key too
    async def doorbell_path():
        async with BytesChannel(address) as c:
            return (await c.info(timeout=5)).doorbell
    path = asyncio.run(doorbell_path())
    b = shared.create("shm", 8, H, torch.float32)

    async def attach():
        await Doorbell.attach(path, "0" * 64, b, dtype="float32", timeout=5)
    err, seconds = timed_error(attach)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and seconds < 1
    b.close_fds()

    async def still_serving():
        await (await answers_right(address, shard, "shm")).close()
    asyncio.run(still_serving())
    assert rss_mb(p.pid) - before < 100


def _raw(address, data: bytes, key, compression=None):
    async def call():
        async with grpc.aio.insecure_channel(address) as ch:
            method = ch.unary_unary("/moe.v1.ExpertService/Forward", request_serializer=bytes,
                                    response_deserializer=bytes)
            await method(data, metadata=auth.call_metadata(key), timeout=10, compression=compression)
    return timed_error(call)


def test_oversized_compressed_and_segment_bombs_are_refused_before_parsing(server, key):
    p, address, shard = server
    before = rss_mb(p.pid)
    segment = expert_pb2.Segment(rows=1).SerializeToString()
    many = b"".join([b"\x12" + bytes([len(segment)]) + segment] * 200_000)  # 200k segments, 1 MB
    cases = [
        (many, None, grpc.StatusCode.INVALID_ARGUMENT, "fields"),
        (b"\x12\x00" * 3_000_000, grpc.Compression.Gzip, grpc.StatusCode.UNIMPLEMENTED, "gzip"),  # 6 MB -> kB
        (bytes(64 << 20), None, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # past the receive limit
        # a tensor header with a million dimensions, packed
        (b"\x0a" + _varint(len(header := b"\x12" + _varint(1_000_000) + b"\x01" * 1_000_000 + b"\x1a\x00"))
         + header, None, grpc.StatusCode.INVALID_ARGUMENT, "field 2"),
    ]
    for data, compression, code, words in cases:
        err, seconds = _raw(address, data, key, compression)
        assert err.code() == code and words in err.details(), (code, err.details())
        assert seconds < 1, (code, seconds)
    assert rss_mb(p.pid) - before < 100

    async def still_serving():
        await (await answers_right(address, shard)).close()
    asyncio.run(still_serving())


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


ATTACKER = r"""
import json, os, socket, sys, time
from moe_core import auth, doorbell_wire, ring, shared
import torch
path, mode, n = "\0" + sys.argv[1], sys.argv[2], int(sys.argv[3])
held, codes = [], {}
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    if mode == "partial":  # a frame that never finishes
        s.sendall(doorbell_wire.LEN.pack(4000) + b"\x99" * 100)
    else:  # whole, authenticated Attaches, kept open
        b = shared.create("shm", 64, %d, torch.float32)
        control, control_fd = ring.Control.create()
        wake = [ring.eventfd(), ring.eventfd()]
        try:
            socket.send_fds(s, [doorbell_wire.pack(["attach", auth.data_key(), "shm", "float32", 64, %d, [], [], ""])],
                            [*b.fds, control_fd, *wake])
        except OSError:  # refused before it was read: the reply is waiting
            pass
        b.close_fds()
        os.close(control_fd)
    held.append(s)
    if mode != "partial":
        try:
            head = s.recv(4, socket.MSG_WAITALL)
        except OSError:
            head = b""
        code = "closed" if len(head) < 4 else __import__("msgpack").unpackb(s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL))[0]
        codes[code] = codes.get(code, 0) + 1
        if code:  # refused: the server has closed it
            held.pop().close()
print(json.dumps(codes), flush=True)
sys.stdin.read()
""" % (H, H)


def _attacker(path: str, mode: str, n: int):
    env = dict(os.environ, **KEY_ENV)
    return subprocess.Popen([sys.executable, "-c", ATTACKER, path.lstrip("\0"), mode, str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_process_holding_thousands_of_sessions_or_partial_frames_cannot_deny_service(server, key):
    p, address, shard = server

    async def path():
        async with BytesChannel(address) as c:
            return (await c.info(timeout=5)).doorbell
    bell = asyncio.run(path())
    before = rss_mb(p.pid)
    attackers = [_attacker(bell, "attach", 2000)]
    try:
        codes = json.loads(attackers[0].stdout.readline())
        # one process gets its share (64 sessions), then RESOURCE_EXHAUSTED at once
        assert codes["0"] == 64 and codes.get(str(EXHAUSTED), 0) + codes.get("closed", 0) == 2000 - 64, codes
        fallbacks = FALLBACKS["full"]

        async def router():
            client = await answers_right(address, shard, "shm")  # the router's own share is still there
            assert client.kind == "shm" and len(client._free) == 1 and FALLBACKS["full"] == fallbacks
            await client.close()
        asyncio.run(router())
        # more processes fill the replica's table: the router falls back to bytes, still right
        attackers += [_attacker(bell, "attach", 64) for _ in range(4)]
        for a in attackers[1:]:
            a.stdout.readline()

        async def router_when_full():
            client = await answers_right(address, shard, "shm")
            assert not client._free and FALLBACKS["full"] == fallbacks + 1  # counted, bytes for a while
            await answers_right(address, shard, "shm")
            await client.close()
        asyncio.run(router_when_full())
        assert rss_mb(p.pid) - before < 100
    finally:
        for a in attackers:
            a.kill()
            a.wait()
    # partial first frames: held at most first_frame_s, never more than the caps
    partial = _attacker(bell, "partial", 60)
    try:
        partial.stdout.readline()
        started = time.monotonic()

        async def router_meanwhile():
            client = await answers_right(address, shard, "shm")
            await client.close()
        asyncio.run(router_meanwhile())
        assert time.monotonic() - started < 1
        assert rss_mb(p.pid) - before < 100
    finally:
        partial.kill()
        partial.wait()


@pytest.mark.parametrize("bad,msg", [
    ("unsealed", "sealed against shrinking"),
    ("size", "the session needs"),
    ("pipe", "regular memory file"),
    ("one", "passes 5 file descriptors"),
    ("rows", "capacity"),
    ("control_size", "the session needs"),
    ("control_unsealed", "sealed against shrinking"),
    ("wake_pipe", "must be eventfds"),
])
def test_buffers_that_could_hurt_the_replica_are_refused(server, key, bad, msg):
    p, address, shard = server

    async def go():
        async with BytesChannel(address) as c:
            path = (await c.info(timeout=5)).doorbell
        capacity = 1 << 20 if bad == "rows" else 8
        nbytes = capacity * H * 4
        fds = []
        for _ in range(1 if bad == "one" else 2):
            if bad == "pipe":
                r, w = os.pipe()
                os.close(w)
                fds.append(r)
                continue
            fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, nbytes + (4096 if bad == "size" else 0))
            if bad != "unsealed":
                import fcntl
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            fds.append(fd)
        control, control_fd = ring.Control.create()
        if bad.startswith("control"):
            os.close(control_fd)
            control_fd = os.memfd_create("c", os.MFD_ALLOW_SEALING)
            os.ftruncate(control_fd, ring.CONTROL_BYTES + (4096 if bad == "control_size" else 0))
            if bad != "control_unsealed":
                import fcntl
                fcntl.fcntl(control_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        wake = ring.eventfd()
        if bad == "wake_pipe":
            os.close(wake)
            wake, w = os.pipe()
            os.close(w)
        fds += [control_fd, wake, ring.eventfd()]
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            socket.send_fds(s, [doorbell_wire.pack(["attach", key, "shm", "float32", capacity, H, [], [], ""])], fds)
            head = s.recv(4, socket.MSG_WAITALL)
            reply = msgpack.unpackb(s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL))
        for fd in fds:
            os.close(fd)
        return reply
    code, details = asyncio.run(go())
    assert code == INVALID and msg in details, details


def test_idle_sessions_expire_and_the_client_reattaches():
    """A session's connection idle past idle_s is closed by the replica; the client drops sessions
    idle for half that, so its next call attaches a fresh one instead of meeting a closed socket."""
    from expert_service.server import ExpertServicer, start_server
    g = torch.Generator().manual_seed(0)
    shard = ExpertShard({(0, 0): tuple(torch.randn(*s, generator=g) / 8 for s in ((48, 32), (32, 48), (48, 32)))})

    async def go():
        servicer = ExpertServicer(shard, limits=doorbell.Limits(idle_s=0.4))
        server, port = await start_server(servicer)
        client = SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            x = torch.randn(3, 32)
            await client.forward(x, [(0, 0, 3)], timeout=5)
            first = client._free[0]
            for _ in range(100):  # the replica closes it
                if not servicer.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not servicer.sessions
            assert torch.equal(await client.forward(x, [(0, 0, 3)], timeout=5), shard.forward(x, [(0, 0, 3)]))
            assert client._free[0] is not first and len(servicer.sessions) == 1
        finally:
            await client.close()
            await server.stop(None)
            servicer.close()
    asyncio.run(go())


def test_stopping_the_server_closes_its_doorbell():
    """stop() ends the doorbell's accept loop and its sessions' connections with the gRPC server,
    so nothing of the replica is left pending on the loop, and the socket accepts no one."""
    from expert_service.server import ExpertServicer, start_server
    g = torch.Generator().manual_seed(0)
    shard = ExpertShard({(0, 0): tuple(torch.randn(*s, generator=g) / 8 for s in ((48, 32), (32, 48), (48, 32)))})

    async def go():
        servicer = ExpertServicer(shard)
        server, port = await start_server(servicer)
        client = SessionChannel(f"127.0.0.1:{port}", "shm")
        try:
            await client.forward(torch.randn(3, 32), [(0, 0, 3)], timeout=5)
            assert len(servicer.sessions) == 1
            bell = servicer.doorbell
            await server.stop(None)
            assert bell._accepting.done() and not bell._connections and not servicer.sessions
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
            assert not [t for t in left if "Doorbell" in repr(t)], left
            with pytest.raises(ConnectionRefusedError):
                doorbell_wire.unix_socket(bell.path)
        finally:
            await client.close()
            servicer.close()
    asyncio.run(go())


def test_processes_starting_together_agree_on_the_per_user_key(tmp_path):
    """With no Ray token and no key given, the first process writes the per-user key file and
    every other one reads the whole key, never a file still being written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MOE_SERVE_DATA_KEY"))}
    env["HOME"] = str(tmp_path)
    code = "from moe_core import auth; print(auth.data_key())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(8)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert sorted(os.listdir(tmp_path / ".config" / "moe-serve")) == ["data_key"]
    assert (tmp_path / ".config" / "moe-serve" / "data_key").stat().st_mode & 0o777 == 0o600
