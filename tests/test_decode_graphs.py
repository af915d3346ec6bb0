"""Decode steps as the CUDA graphs run them (row r is slot r, free slots' rows discarded), here
eagerly on the CPU: the same hidden states, caches and routing counts as the ordinary step, and
the same tokens through the engine. tests_gpu/test_cuda_graphs.py replays them as graphs."""
import asyncio

import torch

from router_service import model
from router_service.engine import local_engine
from router_service.graphs import DecodeGraphs, context_bucket, row_buckets
from router_service.sampling import SamplingParams
from tests.conftest import run
from tests.test_model import in_process


def test_buckets_cover_every_size_with_little_padding():
    rows = row_buckets(200)
    assert rows[:4] == [1, 2, 4, 8] and rows[-1] == 200 and rows == sorted(set(rows))
    for n in range(1, 201):
        r = next(b for b in rows if b >= n)
        assert r - n <= max(8, n // 8)
    for S in range(1, 4097, 7):
        assert S <= context_bucket(S, 4096) <= min(4096, S + max(127, S // 8))
    assert row_buckets(3) == [1, 2, 3]


def test_decode_by_slot_equals_the_ordinary_step(tiny_model):
    cfg, w, disp = in_process(tiny_model)
    pools = model.KVPool(cfg, 8, 64), model.KVPool(cfg, 8, 64)
    g = torch.Generator().manual_seed(3)
    slots, lengths = [5, 0, 2], [9, 4, 13]  # holes at slots 1, 3, 4: their rows ride along
    for pool in pools:
        for slot, n in zip(slots, lengths):
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(slot))
            run(model.forward(cfg, w, pool, ids, [model.Segment(slot, 0, n)], disp))
    tokens = torch.randint(0, cfg.vocab_size, (3,), generator=g).tolist()
    counts = []
    want = run(model.forward(cfg, w, pools[0], tokens, [model.Segment(s, n, 1) for s, n in zip(slots, lengths)],
                             disp, on_route=lambda L, c: counts.append(c)))
    graphs = DecodeGraphs(cfg, w, pools[1], disp, capture=False)
    assert graphs.bucket(slots, lengths) == (8, 64)
    got, counts_LE = run(graphs.step(tokens, lengths, slots))
    assert (got - want).abs().max().item() <= 1e-5
    assert counts_LE.tolist() == counts  # the free slots' rows are not counted
    for s, n in zip(slots, lengths):  # the new positions written, the old ones untouched
        assert (pools[1].k[:, s, :, :n + 1] - pools[0].k[:, s, :, :n + 1]).abs().max().item() <= 1e-5
        assert (pools[1].v[:, s, :, :n + 1] - pools[0].v[:, s, :, :n + 1]).abs().max().item() <= 1e-5


def test_engine_tokens_the_same_with_decode_graphs(tiny_model):
    """Requests of different lengths joining and leaving (slots freed and reused mid-run), greedy and
    seeded: the same tokens and routing counts as the ordinary steps."""
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 1, 9, 30, 2, 11)]
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 14, 6)] + \
        [SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, seed=n) for n in (12, 4, 7)]

    def go(graphs: bool):
        engine = local_engine(tiny_model, max_running=4)
        if graphs:
            engine.graphs = DecodeGraphs(engine.cfg, engine.weights, engine.pool, engine.dispatcher, capture=False)

        async def all_of_them():
            return await asyncio.gather(*(engine.complete(p, s) for p, s in zip(prompts, params)))
        return run(all_of_them()), engine.stats.counts.tolist(), engine.graphs

    want, want_counts, _ = go(False)
    got, got_counts, graphs = go(True)
    assert got == want and got_counts == want_counts
    assert len(graphs.buckets) >= 2  # several row buckets were used
