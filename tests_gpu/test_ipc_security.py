"""CUDA IPC descriptors at a real expert process on a GPU (`make test-gpu`; CI has no GPU): a
session attaches only with the data-plane key, a descriptor's size and offset are checked against
the allocation its handle maps, and the client's reference-counter fields are never used."""
from __future__ import annotations

import asyncio
import os

import grpc
import msgpack
import pytest
import torch

from expert_service import doorbell
from expert_service.processes import ExpertServers
from moe_core import shared
from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from router_service.channels.grpc_bytes import BytesChannel
from router_service.channels.session import Doorbell

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
H = preset("tiny").hidden_size


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = preset("tiny").replace(n_layers=1)
    write_checkpoint(d, cfg, random_weights(cfg, seed=0))
    with ExpertServers(d, {"all": list(range(cfg.n_experts))}, device="cuda", dtype="float32") as s:
        yield s.addresses["all"]


async def _doorbell(address):
    async with BytesChannel(address) as c:
        return (await c.info(timeout=10)).doorbell


def _tamper(b: shared.Buffers, **fields) -> shared.Buffers:
    """The same buffers with fields of their descriptors replaced (by position in _share_cuda_)."""
    names = ["device", "handle", "size", "offset", "ref_handle", "ref_offset", "event", "event_sync"]
    handles = []
    for blob in b.handles:
        f = msgpack.unpackb(blob)
        for k, v in fields.items():
            f[names.index(k)] = v
        handles.append(msgpack.packb(f))
    return shared.Buffers(b.kind, b.x, b.y, handles=tuple(handles), events=b.events, device_uuid=b.device_uuid)


@pytest.mark.parametrize("change,code,words", [
    ({"size": 1 << 30}, grpc.StatusCode.INVALID_ARGUMENT, "the session needs"),
    ({"offset": 1 << 30}, grpc.StatusCode.INVALID_ARGUMENT, "not inside its allocation"),
    ({"handle": b"\0" * 64}, grpc.StatusCode.INVALID_ARGUMENT, "CUDA IPC"),
])
def test_descriptors_outside_the_allocation_are_refused(server, change, code, words):
    async def go():
        path = await _doorbell(server)
        b = shared.create("cuda_ipc", 64, H, torch.float32, "cuda")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await Doorbell.attach(path, shared_key(), _tamper(b, **change), dtype="float32", timeout=10)
        return e.value
    err = asyncio.run(go())
    assert err.code() == code and words in err.details(), err.details()


def shared_key():
    from moe_core import auth
    return auth.data_key()


def test_ref_counter_fields_from_the_client_are_not_used(server, tmp_path):
    """A descriptor pointing the ref counter at a file of ours: the session works and, once the
    replica drops it, that file is untouched."""
    victim = f"/moe-victim-{os.getpid()}"
    path = f"/dev/shm{victim}"
    with open(path, "wb") as f:
        f.write(b"\x07" * 80_000)

    async def go():
        bell_path = await _doorbell(server)
        b = shared.create("cuda_ipc", 64, H, torch.float32, "cuda")
        bell = await Doorbell.attach(bell_path, shared_key(), _tamper(b, ref_handle=victim.encode(),
                                              ref_offset=9000), dtype="float32", timeout=10)
        b.x.normal_()
        b.ready.record()
        await bell.forward(4, [(0, 0, 4)], timeout=10)
        torch.cuda.current_stream().wait_event(b.done)
        torch.cuda.synchronize()
        bell.close()
        await asyncio.sleep(1.0)  # the replica detaches and frees its mapping
    try:
        asyncio.run(go())
        with open(path, "rb") as f:
            assert f.read() == b"\x07" * 80_000
    finally:
        os.unlink(path)


def test_a_session_without_the_key_is_unauthenticated(server):
    async def go():
        path = await _doorbell(server)
        b = shared.create("cuda_ipc", 64, H, torch.float32, "cuda")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await Doorbell.attach(path, "0" * 64, b, dtype="float32", timeout=10)
        return e.value
    assert asyncio.run(go()).code() == grpc.StatusCode.UNAUTHENTICATED
