"""The engine's one KV pool: admission waits for a free slot, and every way a request ends gives
its slot back."""
import asyncio
import random

from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.conftest import run


def test_a_full_pool_makes_the_next_request_wait(tiny_model):
    engine = local_engine(tiny_model, kv_tokens=4 * 512)
    assert engine.pool.n_slots == 4 and engine.pool.max_len == 512

    async def go():
        streams = [engine.generate([1, 2, i], SamplingParams(max_new_tokens=50)) for i in range(4)]
        for s in streams:
            await s.__anext__()
        assert engine.pool.free_slots == 0
        late = asyncio.create_task(engine.complete([5, 6], SamplingParams(max_new_tokens=3)))
        for s in streams:  # several steps run; the fifth request is still queued
            await s.__anext__()
        assert not late.done() and engine.load == {"running": 4, "queued": 1}
        await streams[0].aclose()  # a cancelled request frees its slot: the fifth runs
        tokens, _ = await asyncio.wait_for(late, 30)
        assert len(tokens) == 3
        for s in streams[1:]:
            await s.aclose()
    run(go())
    assert engine.pool.free_slots == 4


def test_a_thousand_requests_leave_the_pool_full(tiny_model):
    engine = local_engine(tiny_model, kv_tokens=8 * 64, max_seq_len=64, max_queued=1000)
    rng = random.Random(0)

    async def one(i):
        prompt = [rng.randrange(512) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 64 - len(prompt)))
        if i % 7 == 0:  # cancelled after its first token
            stream = engine.generate(prompt, params)
            await stream.__anext__()
            await stream.aclose()
        elif i % 11 == 0:
            await engine.score(prompt)
        else:
            tokens, _ = await engine.complete(prompt, params)
            assert 1 <= len(tokens) <= params.max_new_tokens

    async def go():
        await asyncio.gather(*(one(i) for i in range(1000)))
        for _ in range(3):  # let the loop see the last cancellations
            await asyncio.sleep(0)
    run(go())
    assert engine.pool.free_slots == engine.pool.n_slots == 8
    assert not engine.running and not engine.waiting
