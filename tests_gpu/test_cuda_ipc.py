"""CUDA IPC sessions on real GPUs: `make test-gpu` on a machine with CUDA (CI has none).

Expert servers run as `python -m expert_service` processes pinned to one physical GPU each, the
way Ray pins a replica (CUDA_VISIBLE_DEVICES); this process is the router, on GPU 0. A server on
GPU 0 computes on the router's buffers in place; one on another GPU maps them as a peer.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from expert_service.experts import ExpertShard
from expert_service.processes import ExpertServers
from moe_core.checkpoint import Checkpoint, random_weights, write_checkpoint
from moe_core.config import preset
from router_service.channels.session import SessionChannel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPUS = list(range(torch.cuda.device_count()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    cfg = preset("bench").replace(n_layers=1)
    write_checkpoint(d, cfg, random_weights(cfg, seed=0), dtype=torch.bfloat16)
    return d


@pytest.fixture(scope="module")
def servers(model_dir):
    """Every expert on every GPU, twice: a server pinned to the GPU (it sees only that one, as under
    Ray) and one that sees every GPU and is told `cuda:g`. {(how, g): address}."""
    groups = [ExpertServers(model_dir, {f"gpu{g}": list(range(8)) for g in GPUS}, device="cuda", dtype="bfloat16",
                            gpus={f"gpu{g}": g for g in GPUS})]
    groups += [ExpertServers(model_dir, {f"gpu{g}": list(range(8))}, device=f"cuda:{g}", dtype="bfloat16")
               for g in GPUS]
    try:
        yield {**{("pinned", g): groups[0].addresses[f"gpu{g}"] for g in GPUS},
               **{("visible", g): groups[1 + g].addresses[f"gpu{g}"] for g in GPUS}}
    finally:
        for group in groups:
            group.close()


def _segments(n_rows: int, n_experts: int = 8):
    cut = [n_rows * e // n_experts for e in range(n_experts + 1)]
    return [(0, e, b - a) for e, (a, b) in enumerate(zip(cut, cut[1:]))]


@pytest.mark.parametrize("how", ["pinned", "visible"])
@pytest.mark.parametrize("gpu", GPUS)
def test_session_output_equals_in_process_on_own_and_peer_gpu(model_dir, servers, gpu, how):
    dev = torch.device("cuda:0")
    shard = ExpertShard.load(Checkpoint(model_dir), [(0, e) for e in range(8)], device=dev, dtype=torch.bfloat16)
    hidden = shard.weights[0, 0][0].shape[1]

    async def calls():
        async with SessionChannel(servers[how, gpu], "cuda_ipc") as client:
            outs = []
            for i, n in enumerate((1, 37, 300, 300, 1024)):
                # rows produced by GPU work still queued on this stream when the call is made: a
                # replica that did not wait for the `ready` event would read the last call's rows
                big = torch.randn(4096, 4096, device=dev)
                for _ in range(20):
                    big = torch.tanh(big @ big / 64)
                x = (torch.randn(n, hidden, generator=torch.Generator().manual_seed(i)).to(dev)
                     + big[:n, :hidden] * 0).to(torch.bfloat16)
                y = await client.forward(x, _segments(n), timeout=60)
                outs.append((x, y))
            session = client._free[0]
            return outs, session.buffers.kind, session.doorbell is not None
    outs, kind, doorbell = asyncio.run(calls())
    assert (kind, doorbell, len(outs)) == ("cuda_ipc", True, 5)
    for x, y in outs:
        assert y.device == torch.device("cuda:0")
        assert torch.equal(y, shard.forward(x, _segments(x.shape[0])))


@pytest.mark.skipif(len(GPUS) < 2, reason="needs two GPUs")
def test_concurrent_sessions_on_two_gpus(servers, model_dir):
    """Calls in flight at once to a replica on the router's GPU and one on a peer."""
    dev = torch.device("cuda:0")
    shard = ExpertShard.load(Checkpoint(model_dir), [(0, e) for e in range(8)], device=dev, dtype=torch.bfloat16)
    hidden = shard.weights[0, 0][0].shape[1]
    xs = [torch.randn(64 * (i + 1), hidden, device=dev).to(torch.bfloat16) for i in range(8)]

    async def calls():
        clients = [SessionChannel(servers["pinned", g], "cuda_ipc") for g in (0, 1)]
        try:
            return await asyncio.gather(*(clients[i % 2].forward(x, _segments(x.shape[0]), timeout=60)
                                          for i, x in enumerate(xs)))
        finally:
            for c in clients:
                await c.close()
    for x, y in zip(xs, asyncio.run(calls())):
        assert torch.equal(y, shard.forward(x, _segments(x.shape[0])))


def test_decode_size_calls_replay_graphs_that_read_each_calls_rows(tmp_path):
    """One-segment calls of up to 256 rows replay a CUDA graph captured on the session's buffers
    (rows padded to a power of two): each replay reads that call's rows, so new rows of a size seen
    before, and sizes sharing a padded size, all give the in-process outputs; float32, so a
    graph that read stale rows could not hide inside bf16 rounding."""
    cfg = preset("bench").replace(n_layers=1)
    write_checkpoint(tmp_path, cfg, random_weights(cfg, seed=1))
    dev = torch.device("cuda:0")
    shard = ExpertShard.load(Checkpoint(tmp_path), [(0, e) for e in range(8)], device=dev)
    sizes = [1, 1, 3, 4, 3, 2, 64, 37, 50, 257, 1, 256]

    async def calls(client):
        outs = []
        for i, n in enumerate(sizes):
            x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(i)).to(dev)
            segments = [(0, i % 2, n)]  # expert 0's graphs of 4, 64 and 1 rows each replay with new rows
            outs.append((x, segments, await client.forward(x, segments, timeout=60)))
        return outs

    with ExpertServers(tmp_path, {"all": list(range(8))}, device="cuda", dtype="float32", gpus={"all": 0}) as s:
        async def go():
            async with SessionChannel(s.addresses["all"], "cuda_ipc") as client:
                return await calls(client)
        outs = asyncio.run(go())
    for x, segments, y in outs:
        torch.testing.assert_close(y, shard.forward(x, segments), rtol=1e-4, atol=1e-5)
