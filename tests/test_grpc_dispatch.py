"""The gRPC dispatcher against real expert servers on loopback (no Ray)."""
import pytest
import torch

from expert_service.experts import ExpertShard
from expert_service.server import ExpertServicer, start_server
from router_service import model
from router_service.dispatch import InProcessDispatcher, remote_dispatcher
from router_service.replica_pool import split_segments
from tests.conftest import run


def test_split_segments_covers_every_row_once():
    segs = [(0, 1, 10), (0, 3, 1), (0, 5, 21)]
    for k in (1, 2, 3, 7):
        parts = split_segments(segs, k)
        assert [a for a, _, _ in parts][0] == 0 and parts[-1][1] == 32
        assert all(b - a == sum(n for _, _, n in s) for a, b, s in parts)
        merged = {}
        for _, _, s in parts:
            for L, E, n in s:
                merged[(L, E)] = merged.get((L, E), 0) + n
        assert merged == {(0, 1): 10, (0, 3): 1, (0, 5): 21}


def test_hot_shard_rows_split_across_its_replicas_same_numbers():
    g = torch.Generator().manual_seed(0)
    H, I, E = 16, 24, 4
    weights = {(0, e): tuple(torch.randn(*s, generator=g) / 4 for s in ((I, H), (H, I), (I, H))) for e in range(E)}

    async def go():
        servicers, servers, table = [], [], {}
        for e in range(E):  # expert 0 is hot: three replicas
            for _ in range(3 if e == 0 else 1):
                sv = ExpertServicer(ExpertShard({(0, e): weights[(0, e)]}))
                server, port = await start_server(sv)
                servicers.append((e, sv))
                servers.append(server)
                table.setdefault(f"expert-{e}", []).append(f"127.0.0.1:{port}")

        async def lookup():
            return table
        disp = remote_dispatcher({(0, e): f"expert-{e}" for e in range(E)}, lookup, split_min_rows=4)
        x = torch.randn(64, H, generator=g)
        gate = torch.zeros(E, H)
        gate[0] += 1.0  # every token routes to expert 0 first
        got = await model.moe(0, x, gate, 2, disp)
        want = await model.moe(0, x, gate, 2, InProcessDispatcher(ExpertShard(weights)))
        await disp.close()
        for server in servers:
            await server.stop(None)
        return got, want, [sv.rows for e, sv in servicers if e == 0]
    got, want, hot_rows = run(go())
    torch.testing.assert_close(got, want)
    assert len(hot_rows) == 3 and all(r > 0 for r in hot_rows)  # every replica of the hot expert worked


@pytest.mark.parametrize("shared", ["grpc", "shm"])
def test_shards_with_scattered_rows_and_one_slice_each_equal_in_process(shared):
    """Experts 0 and 2 in one shard, 1 and 3 in another (their rows are two slices of the layer's,
    gathered and scattered), and 4 alone (one slice, written straight into the layer's output)."""
    g = torch.Generator().manual_seed(1)
    H, I, E = 16, 24, 5
    weights = {(0, e): tuple(torch.randn(*s, generator=g) / 4 for s in ((I, H), (H, I), (I, H))) for e in range(E)}
    shards = {"even": [0, 2], "odd": [1, 3], "four": [4]}

    async def go():
        servers, table = [], {}
        for name, experts in shards.items():
            server, port = await start_server(ExpertShard({(0, e): weights[(0, e)] for e in experts}))
            servers.append(server)
            table[name] = [f"127.0.0.1:{port}"]

        async def lookup():
            return table
        disp = remote_dispatcher({(0, e): n for n, es in shards.items() for e in es}, lookup, channel=shared)
        x = torch.randn(40, H, generator=g)
        gate = torch.randn(E, H, generator=g)
        got = [await model.moe(0, x, gate, 2, disp) for _ in range(2)]  # the second reuses the sessions
        want = await model.moe(0, x, gate, 2, InProcessDispatcher(ExpertShard(weights)))
        await disp.close()
        for server in servers:
            await server.stop(None)
        return got, want
    got, want = run(go())
    for y in got:
        torch.testing.assert_close(y, want)


def test_a_shard_with_no_live_replica_waits_for_one_then_gives_up_past_its_wait():
    """The only replica of a shard is gone: the call waits until one registers (it would restart
    under Serve) and returns its rows; with no replica back within `wait_s` it fails UNAVAILABLE."""
    import asyncio

    from router_service.replica_pool import ExpertsUnavailable
    g = torch.Generator().manual_seed(0)
    H, I = 16, 24
    weights = {(0, 0): tuple(torch.randn(*s, generator=g) / 4 for s in ((I, H), (H, I), (I, H)))}
    x = torch.randn(5, H, generator=g)
    want = ExpertShard(weights).forward(x, [(0, 0, 5)])

    async def go():
        table = {"expert-0": []}
        looked_up = asyncio.Event()

        async def lookup():
            looked_up.set()
            return table
        disp = remote_dispatcher({(0, 0): "expert-0"}, lookup, wait_s=30, wait_poll_s=0.05)
        call = asyncio.create_task(disp.run_experts(0, x, [5]))
        await looked_up.wait()
        await asyncio.sleep(0.3)
        assert not call.done()  # held, not failed
        server, port = await start_server(ExpertServicer(ExpertShard(weights)))
        table["expert-0"] = [f"127.0.0.1:{port}"]  # the replica is back
        got = await asyncio.wait_for(call, 10)
        waits = disp.pool.waits
        await disp.close()
        await server.stop(None)

        short = remote_dispatcher({(0, 0): "expert-0"}, lookup, wait_s=0.2, wait_poll_s=0.05)
        table["expert-0"] = []
        with pytest.raises(ExpertsUnavailable, match="no live replica of expert shard expert-0 after waiting"):
            await short.run_experts(0, x, [5])
        await short.close()
        return got, waits
    got, waits = run(go())
    torch.testing.assert_close(got, want)
    assert waits == 1
