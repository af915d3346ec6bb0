"""The same-node fast path: tensors through shared buffers, gRPC carrying only the envelope."""
import os

import grpc
import pytest
import torch

from expert_service import shared
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
            assert fast.shared == "shm" and len(servicer.sessions) >= 1
            assert len(_ours() - before) >= 2  # the data went through files, not the socket
        finally:
            await fast.close()
            await plain.close()
            await server.stop(None)
        return servicer
    servicer = run(go())
    assert not servicer.sessions and _ours() == before


@pytest.mark.parametrize("names,msg", [
    (["../../etc/passwd", "moe-" + "0" * 32], "not one this service created"),
    (["moe-" + "a" * 32, "moe-" + "b" * 32], "missing"),
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
