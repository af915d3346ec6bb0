"""The remote dispatcher over every channel (router_service/channels) against real expert
servers on loopback: the in-process dispatcher's numbers, also with a hot expert's rows split over
its replicas, a replica lost mid-call (retried on another) and a deadline that runs out mid-call.
"grpc" and "shm" against `python -m expert_service` processes (no Ray), "handle" through a real
Serve app; CUDA IPC in tests_gpu/test_cuda_ipc.py."""
import asyncio
import signal
import time

import pytest
import torch

from expert_service.experts import ExpertShard
from expert_service.processes import ExpertServers
from expert_service.server import ExpertServicer, start_server
from moe_core.checkpoint import Checkpoint
from router_service import model
from router_service.channels.grpc_bytes import BytesChannel
from router_service.dispatch import InProcessDispatcher, remote_dispatcher
from router_service.replica_pool import split_segments
from tests.conftest import run, stop

KINDS = ["grpc", "shm"]
COUNTS = [40, 0, 30, 5, 0, 0, 25, 0]  # rows per expert in one layer: 100, expert 0 hot


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


@pytest.fixture
def two_replicas(tiny_model):
    """Two expert server processes, each serving every expert of the tiny model."""
    with ExpertServers(tiny_model, {"a": list(range(8)), "b": list(range(8))}, threads=1) as servers:
        yield servers


def _setup(tiny_model):
    ckpt = Checkpoint(tiny_model)
    pairs = [(L, e) for L in range(ckpt.config.n_layers) for e in range(ckpt.config.n_experts)]
    x = torch.randn(sum(COUNTS), ckpt.config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = run(InProcessDispatcher(ExpertShard.load(ckpt, pairs)).run_experts(1, x, COUNTS))
    return {p: "all" for p in pairs}, x, want


async def _calls(address) -> int:
    async with BytesChannel(address) as c:
        return (await c.info(timeout=10)).calls


@pytest.mark.parametrize("kind", KINDS)
def test_a_hot_shard_split_over_its_replicas_equals_in_process(tiny_model, two_replicas, kind):
    shard_of, x, want = _setup(tiny_model)
    addresses = list(two_replicas.addresses.values())

    async def go():
        async def lookup():
            return {"all": addresses}
        d = remote_dispatcher(shard_of, lookup, channel=kind, split_min_rows=8)
        try:
            outs = [await d.run_experts(1, x, COUNTS) for _ in range(2)]  # the second reuses the sessions
        finally:
            await d.close()
        return outs, [await _calls(a) for a in addresses]
    outs, calls = run(go())
    for y in outs:
        torch.testing.assert_close(y, want)
    assert calls == [2, 2]  # each call's rows went half to each replica


@pytest.mark.parametrize("kind", KINDS)
def test_a_replica_lost_mid_call_is_retried_on_another(tiny_model, two_replicas, kind):
    """The call is in flight on replica a (stopped, so it cannot answer) when a is killed: the
    pool reports a, finds b in the directory, and b answers the same rows."""
    shard_of, x, want = _setup(tiny_model)
    a, b = two_replicas.addresses.values()

    async def go():
        table, forgotten = {"all": [a]}, []

        async def lookup():
            return table

        async def forget(address):
            forgotten.append(address)
        d = remote_dispatcher(shard_of, lookup, forget, channel=kind, refresh_s=3600)
        try:
            first = await d.run_experts(1, x, COUNTS)  # on a (with its session, for shm)
            stop(two_replicas.procs[0])
            call = asyncio.create_task(d.run_experts(1, x, COUNTS))
            while not d.pool.replicas["all"][0].outstanding:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # posted to a, which cannot answer
            assert not call.done()
            table["all"] = [a, b]
            two_replicas.procs[0].kill()
            got = await asyncio.wait_for(call, 30)
            return first, got, forgotten, d.pool.retries
        finally:
            await d.close()
    first, got, forgotten, retries = run(go())
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(got, want)
    assert forgotten == [a] and retries == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_deadline_that_runs_out_mid_call_fails_it_and_drops_its_buffers(tiny_model, two_replicas, kind):
    """A replica that stops answering mid-call: the call fails at its deadline (TimeoutError, the
    gateway's DEADLINE_EXCEEDED); the session the replica may still write is never used again, and
    once it answers again the next call gets the right rows through a new session."""
    shard_of, x, want = _setup(tiny_model)
    a = two_replicas.addresses["a"]

    async def go():
        async def lookup():
            return {"all": [a]}
        d = remote_dispatcher(shard_of, lookup, channel=kind, refresh_s=3600)
        try:
            await d.run_experts(1, x, COUNTS)
            channel = d.pool.replicas["all"][0].channel
            before = [s.id for s in getattr(channel, "_free", [])]
            stop(two_replicas.procs[0])
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="did not answer within the deadline"):
                await d.run_experts(1, x, COUNTS, time.monotonic() + 0.5)
            waited = time.monotonic() - started
            kept = [s.id for s in getattr(channel, "_free", [])]
            two_replicas.procs[0].send_signal(signal.SIGCONT)
            got = await d.run_experts(1, x, COUNTS)
            after = [s.id for s in getattr(channel, "_free", [])]
            return waited, before, kept, after, got
        finally:
            two_replicas.procs[0].send_signal(signal.SIGCONT)
            await d.close()
    waited, before, kept, after, got = run(go())
    assert 0.5 <= waited < 5
    torch.testing.assert_close(got, want)
    if kind == "shm":
        assert len(before) == 1 and kept == [] and len(after) == 1 and after != before


@pytest.mark.cluster
def test_the_serve_handle_channel_equals_in_process_and_counts_replica_load(tiny_model):
    """`transport: handle`: every expert call through the deployments' Serve handles; generation
    equals the in-process engine's and the replicas count the calls (the autoscaler's load)."""
    from ray import serve

    from moe_serve import client
    from router_service.engine import local_engine
    from router_service.sampling import SamplingParams
    from tests.cluster_fixtures import running_app

    prompts = [[1, 2, 3], [7] * 20, list(range(40, 90))]
    want = [run(local_engine(tiny_model).complete(p, SamplingParams(max_new_tokens=6)))[0] for p in prompts]
    with running_app(tiny_model, transport="handle") as (address, _):
        got = [client.generate(address, prompt_ids=p, params=SamplingParams(max_new_tokens=6))["token_ids"]
               for p in prompts]
        calls = [serve.get_deployment_handle(f"expert-{e}", app_name="moe").info.remote().result()["calls"]
                 for e in range(8)]
    assert got == want
    assert sum(calls) > 0 and all(c > 0 for c in calls)


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


def test_the_router_imports_no_expert_server_code():
    """The channels' client ends live with the router; what both ends speak lives in moe_core."""
    import subprocess
    import sys
    code = ("import sys, router_service.router, router_service.engine, router_service.channels.by_name; "
            "print(sorted(m for m in sys.modules if m.startswith('expert_service')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["expert_service", "expert_service.directory", "expert_service.experts"]
