"""Chunked prefill: a prompt longer than the step's token budget joins over several steps while a
decoding request keeps getting a token every step, and its result is the unchunked one."""
import asyncio
import statistics
import time

import pytest
import torch

from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.conftest import run

LONG = 3000


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_long")
    cfg = preset("tiny").replace(max_position_embeddings=4096)
    write_checkpoint(d, cfg, random_weights(cfg, seed=0))
    return d


@pytest.mark.xfail(strict=True, reason="measured 2026-12-02 on the 2-core CPU: a decode step takes about 1 ms, a "
                   "step with a 255-token chunk 18-65 ms (the chunk's attention over its growing prefix), "
                   "so the gaps grow 40x, not < 2x; needs a smaller chunk budget per step or cheaper prefill")
def test_decodes_keep_their_pace_while_a_long_prompt_joins(long_model):
    engine = local_engine(long_model, max_step_tokens=256, kv_tokens=2 * 4096)
    prompt = [(7 * i) % 500 + 3 for i in range(LONG)]

    async def go():
        stamps, joined = [], {}

        async def decoder():
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_new_tokens=400)):
                stamps.append(time.perf_counter())
                if len(stamps) == 40:
                    joined["at"] = len(stamps)
                    joined["task"] = asyncio.create_task(engine.complete(prompt, SamplingParams(max_new_tokens=2)))
                if "task" in joined and joined["task"].done() and "end" not in joined:
                    joined["end"] = len(stamps)
        await decoder()
        return stamps, joined["at"], joined["end"], await joined["task"]
    stamps, at, end, (long_tokens, _) = run(go())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    before, during = gaps[5:at - 1], gaps[at:end - 1]
    # 3000 tokens in chunks of at most 255 beside the decode: at least 12 steps, each with a token
    assert end - at >= LONG // 256
    assert statistics.median(during) < 2 * statistics.median(before)

    whole = local_engine(long_model, kv_tokens=4096)
    assert run(whole.complete(prompt, SamplingParams(max_new_tokens=2)))[0] == long_tokens


def test_chunked_score_equals_whole(long_model):
    ids = [(11 * i) % 500 + 1 for i in range(700)]
    chunked = run(local_engine(long_model, max_step_tokens=128, kv_tokens=4096).score(ids))
    whole = run(local_engine(long_model, kv_tokens=4096).score(ids))
    assert chunked.shape == (700, 512)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
