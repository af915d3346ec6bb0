"""The router's engine on a real GPU: `make test-gpu` on a machine with CUDA (CI has none).

float32 on the GPU gives the CPU's tokens; bfloat16 stays close; one step waits for the GPU once
per layer (the gate's row counts) and twice before its first layer, no more.
"""
from __future__ import annotations

import asyncio
import warnings

import pytest
import torch

from expert_service.experts import ExpertShard
from moe_core.checkpoint import Checkpoint, all_pairs
from router_service import model
from router_service.dispatch import InProcessDispatcher
from router_service.engine import local_engine
from router_service.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[1, 2, 3], list(range(5, 30)), [7], list(range(100, 140, 3))]
GREEDY = SamplingParams(max_new_tokens=12)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)


def _batch(engine, params):
    async def go():
        return await asyncio.gather(*(engine.complete(p, params) for p in PROMPTS))
    return asyncio.run(go())


def test_float32_on_the_gpu_gives_the_cpu_tokens(model_dir):
    cpu, gpu = local_engine(model_dir), local_engine(model_dir, device="cuda")
    assert gpu.weights.device.type == "cuda"
    ids = list(range(3, 60))
    want, got = asyncio.run(cpu.score(ids)), asyncio.run(gpu.score(ids))
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5
    for params in (GREEDY, SEEDED):
        assert _batch(gpu, params) == _batch(cpu, params)
    assert _batch(local_engine(model_dir, device="cuda", micro_batches=2), GREEDY) == _batch(gpu, GREEDY)


def test_bfloat16_on_the_gpu_stays_close(model_dir):
    engine = local_engine(model_dir, device="cuda", dtype=torch.bfloat16)
    ids = list(range(3, 60))
    want, got = asyncio.run(local_engine(model_dir).score(ids)), asyncio.run(engine.score(ids))
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    tokens = _batch(engine, SEEDED)
    assert tokens == _batch(engine, SEEDED)  # seeded: the same again
    assert all(len(t) == 12 for t, _ in tokens)


def test_one_step_waits_for_the_gpu_once_per_layer(model_dir):
    ckpt = Checkpoint(model_dir)
    cfg, dt = ckpt.config, torch.bfloat16
    w = model.DenseWeights.load(ckpt, dtype=dt, device="cuda")
    disp = InProcessDispatcher(ExpertShard.load(ckpt, all_pairs(cfg), device="cuda", dtype=dt))
    pool = model.KVPool(cfg, 4, 64, dt, "cuda")
    for slot, n in enumerate((5, 17, 9)):
        asyncio.run(model.forward(cfg, w, pool, list(range(n)), [model.Segment(slot, 0, n)], disp))
    segs = [model.Segment(slot, n, 1) for slot, n in enumerate((5, 17, 9))] + [model.Segment(3, 0, 11)]
    tokens = list(range(14))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            asyncio.run(model.forward(cfg, w, pool, tokens, segs, disp))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [s for s in syncs if "called a synchronizing" in str(s.message)]
    assert len(syncs) <= cfg.n_layers + 2, [(s.filename, s.lineno) for s in syncs]
    assert pool.k.dtype == dt
