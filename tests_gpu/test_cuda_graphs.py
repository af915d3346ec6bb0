"""Decode steps replayed from CUDA graphs give what the same steps give eagerly: float32 and bfloat16,
the experts inside the graph (in-process, bfloat16) and between its pieces (any dispatcher)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from expert_service.experts import ExpertShard
from moe_core.checkpoint import Checkpoint, all_pairs
from router_service import model
from router_service.dispatch import InProcessDispatcher
from router_service.engine import local_engine
from router_service.graphs import DecodeGraphs
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 1, 9, 30, 2, 11)]
PARAMS = [SamplingParams(max_new_tokens=n) for n in (3, 9, 14, 6)] + \
    [SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, seed=n) for n in (12, 4, 7)]


class Between:
    """The in-process experts without `on_device`: the graphs split at every expert call."""

    def __init__(self, inner):
        self.inner = inner

    async def run_experts(self, layer, x_NH, counts_E, deadline=None, out_NH=None):
        return await self.inner.run_experts(layer, x_NH, counts_E, deadline, out_NH)


def _tokens(engine):
    async def go():
        return await asyncio.gather(*(engine.complete(p, s) for p, s in zip(PROMPTS, PARAMS)))
    return asyncio.run(go())


def test_float32_graphs_give_the_eager_tokens(model_dir):
    eager = _tokens(local_engine(model_dir, device="cuda", max_running=4, cuda_graphs=False))
    engine = local_engine(model_dir, device="cuda", max_running=4)
    assert engine.graphs is not None and engine.graphs.experts is None  # float32: pieces around the experts
    assert _tokens(engine) == eager == _tokens(local_engine(model_dir, max_running=4))  # and the CPU's
    assert len(engine.graphs.buckets) >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inside", [True, False])
def test_a_replayed_step_equals_the_same_step_run_eagerly(model_dir, dtype, inside):
    if inside and dtype != torch.bfloat16:
        pytest.skip("experts run inside the graph in bfloat16 only")
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    w = model.DenseWeights.load(ckpt, dtype=dtype, device="cuda")
    disp = InProcessDispatcher(ExpertShard.load(ckpt, all_pairs(cfg), device="cuda", dtype=dtype))
    disp = disp if inside else Between(disp)
    pools = [model.KVPool(cfg, 8, 64, dtype, "cuda") for _ in range(2)]
    slots, lengths = [5, 0, 2], [9, 4, 13]
    for pool in pools:
        for slot, n in zip(slots, lengths):
            asyncio.run(model.forward(cfg, w, pool, list(range(1, n + 1)), [model.Segment(slot, 0, n)], disp))
    graphs = [DecodeGraphs(cfg, w, pools[0], disp, capture=True), DecodeGraphs(cfg, w, pools[1], disp, capture=False)]
    assert (graphs[0].experts is not None) == inside
    for step in range(3):  # the first captures; the next replay with new tokens and positions
        tokens, positions = [7 + step, 8, 9 * step], [n + step for n in lengths]
        (h0, c0), (h1, c1) = (asyncio.run(g.step(tokens, positions, slots)) for g in graphs)
        assert torch.equal(h0, h1) and torch.equal(c0, c1)
    assert torch.equal(pools[0].k, pools[1].k) and torch.equal(pools[0].v, pools[1].v)
    b = next(iter(graphs[0].buckets.values()))
    assert len(b.graphs) == (1 if inside else cfg.n_layers + 1)
