"""Chunked prefill: a prompt longer than the step's token budget joins over several steps while a
decoding request keeps getting a token every step, and its result is the unchunked one."""
import asyncio
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


def test_decodes_get_a_token_every_step_while_a_long_prompt_joins(long_model):
    """How long those steps take beside a decode-only step is a benchmark's question (it depends on
    the machine); what must hold is that no step leaves the decode out."""
    engine = local_engine(long_model, max_step_tokens=256, kv_tokens=2 * 4096)
    prompt = [(7 * i) % 500 + 3 for i in range(LONG)]
    plans = []
    plan = engine._plan
    engine._plan = lambda batch: plans.append(plan(batch)) or plans[-1]  # what each step runs

    async def go():
        long = None
        async for tok in engine.generate([1, 2, 3], SamplingParams(max_new_tokens=400)):
            if long is None and engine.stats.tokens > 40:
                long = asyncio.create_task(engine.complete(prompt, SamplingParams(max_new_tokens=2)))
        return await long
    long_tokens, _ = run(go())
    joining = [{s.prompt_len: n for s, n in step} for step in plans if any(s.prompt_len == LONG for s, _ in step)]
    # 3000 tokens in chunks of 255 (the budget less the decode's token), then its second token; each step
    # also runs the decode's token
    assert [step[LONG] for step in joining] == [255] * (LONG // 255) + [LONG % 255, 1]
    assert all(step[3] == 1 for step in joining)

    whole = local_engine(long_model, kv_tokens=4096)
    assert run(whole.complete(prompt, SamplingParams(max_new_tokens=2)))[0] == long_tokens


def test_chunked_score_equals_whole(long_model):
    ids = [(11 * i) % 500 + 1 for i in range(700)]
    chunked = run(local_engine(long_model, max_step_tokens=128, kv_tokens=4096).score(ids))
    whole = run(local_engine(long_model, kv_tokens=4096).score(ids))
    assert chunked.shape == (700, 512)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
