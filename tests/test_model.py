"""The math against slow, obviously-right references, and the KV cache against full recompute."""
import torch
import torch.nn.functional as F

from expert_service.experts import ExpertShard
from moe_core.checkpoint import Checkpoint, all_pairs
from router_service import model
from router_service.dispatch import InProcessDispatcher
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.conftest import run


def reference_moe(x_TH, gate_EH, experts, top_k):
    """Token by token: softmax over experts, top-k, renormalise, weighted sum of expert outputs."""
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        probs = torch.softmax(gate_EH @ x_TH[t], dim=-1)
        top = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:top_k]
        total = sum(probs[e] for e in top)
        for e in top:
            w1, w2, w3 = experts[e]
            y = w2 @ (F.silu(w1 @ x_TH[t]) * (w3 @ x_TH[t]))
            out[t] += probs[e] / total * y
    return out


def test_gate_and_experts_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    for T, E, K, H, I in [(1, 8, 2, 16, 24), (37, 8, 2, 32, 20), (50, 4, 1, 8, 8), (64, 3, 3, 12, 30)]:
        x = torch.randn(T, H, generator=g)
        gate = torch.randn(E, H, generator=g)
        experts = {(0, e): tuple(torch.randn(*s, generator=g) / 4 for s in ((I, H), (H, I), (I, H))) for e in range(E)}
        disp = InProcessDispatcher(ExpertShard(experts))
        got = run(model.moe(0, x, gate, K, disp))
        want = reference_moe(x, gate, [experts[(0, e)] for e in range(E)], K)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_route_weights_sum_to_one_and_pick_largest():
    g = torch.Generator().manual_seed(1)
    x, gate = torch.randn(20, 16, generator=g), torch.randn(8, 16, generator=g)
    w, idx = model.route(x, gate, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    probs = torch.softmax(x @ gate.T, -1)
    assert torch.equal(idx.sort(-1).values, probs.topk(2).indices.sort(-1).values)


def in_process(model_dir):
    """(config, dense weights, in-process dispatcher) of a checkpoint."""
    ckpt = Checkpoint(model_dir)
    return ckpt.config, model.DenseWeights.load(ckpt), InProcessDispatcher(ExpertShard.load(ckpt, all_pairs(ckpt.config)))


def test_incremental_decode_equals_full_recompute(tiny_model):
    cfg, w, disp = in_process(tiny_model)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    pool = model.KVPool(cfg, 3, 32)

    full = run(model.forward(cfg, w, pool, ids, [model.Segment(0, 0, 24)], disp))
    steps = [run(model.forward(cfg, w, pool, ids[:10], [model.Segment(2, 0, 10)], disp))]
    for p in range(10, 24):  # one token at a time, reading the cache
        steps.append(run(model.forward(cfg, w, pool, ids[p:p + 1], [model.Segment(2, p, 1)], disp)))
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.k[:, 2], pool.k[:, 0], atol=1e-6, rtol=1e-6)
    assert pool.k[:, 1].abs().max() == 0  # no other slot written


def test_chunked_prompt_equals_whole(tiny_model):
    cfg, w, disp = in_process(tiny_model)
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    pool = model.KVPool(cfg, 2, 64)
    whole = run(model.forward(cfg, w, pool, ids, [model.Segment(0, 0, 40)], disp))
    chunks = [run(model.forward(cfg, w, pool, ids[a:b], [model.Segment(1, a, b - a)], disp))
              for a, b in ((0, 16), (16, 17), (17, 33), (33, 40))]
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-5, rtol=1e-5)


def test_mixed_step_equals_each_sequence_alone(tiny_model):
    """Decodes of different cache lengths, in scattered slots, share one attention call beside
    a prefill."""
    ckpt = Checkpoint(tiny_model)
    cfg, w = ckpt.config, model.DenseWeights.load(ckpt)
    disp = InProcessDispatcher(ExpertShard.load(ckpt, all_pairs(cfg)))
    g = torch.Generator().manual_seed(3)
    lengths = [5, 17, 1]  # cached positions of three decoding sequences; then a new prompt of 9
    slots = [3, 0, 5]
    seqs = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=g) for n in lengths + [8]]

    def filled():
        pool = model.KVPool(cfg, 7, 32)
        for ids, n, s in zip(seqs[:3], lengths, slots):
            run(model.forward(cfg, w, pool, ids[:n], [model.Segment(s, 0, n)], disp))
        return pool
    pool = filled()
    alone = [run(model.forward(cfg, w, pool, ids[n:n + 1], [model.Segment(s, n, 1)], disp))
             for ids, n, s in zip(seqs, lengths, slots)]
    alone.append(run(model.forward(cfg, w, pool, seqs[3][:9], [model.Segment(1, 0, 9)], disp)))
    pool = filled()
    segs = [model.Segment(s, n, 1) for n, s in zip(lengths, slots)] + [model.Segment(1, 0, 9)]
    tokens = torch.cat([ids[n:n + 1] for ids, n in zip(seqs[:3], lengths)] + [seqs[3][:9]])
    together = run(model.forward(cfg, w, pool, tokens, segs, disp))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    decodes_only = run(model.forward(cfg, w, filled(), tokens[:3], segs[:3], disp))
    torch.testing.assert_close(decodes_only, torch.cat(alone[:3]), atol=1e-5, rtol=1e-5)


def test_batched_requests_equal_solo(tiny_model):
    engine = local_engine(tiny_model)
    prompts = [[1, 2, 3], list(range(5, 30)), [7], list(range(100, 140, 3))]
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 20, 9)]
    solo = [run(engine.complete(p, s)) for p, s in zip(prompts, params)]

    async def together():
        import asyncio
        return await asyncio.gather(*(engine.complete(p, s) for p, s in zip(prompts, params)))
    assert run(together()) == solo


def test_micro_batches_give_the_same_tokens(tiny_model):
    import asyncio
    prompts = [[1, 2, 3], list(range(5, 30)), [7], list(range(100, 140, 3)), [4, 4]]
    params = SamplingParams(max_new_tokens=10)

    async def together(engine):
        return await asyncio.gather(*(engine.complete(p, params) for p in prompts))
    one = run(together(local_engine(tiny_model)))
    two = run(together(local_engine(tiny_model, micro_batches=2)))
    three = run(together(local_engine(tiny_model, micro_batches=3)))
    assert one == two == three


def test_split_balances_tokens():
    from router_service.engine import _split

    class S:
        pass
    batch = [(S(), n) for n in (10, 1, 1, 1, 9, 1)]
    groups = _split(batch, 2)
    assert len(groups) == 2 and sum(map(len, groups)) == 6
    assert [sum(n for _, n in g) for g in groups] == [12, 11]
    assert _split(batch[:1], 2) == [batch[:1]]
