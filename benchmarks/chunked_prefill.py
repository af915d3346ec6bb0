"""Question: do decoding requests keep their pace while a long prompt joins (chunked prefill)?

One request decodes; after a while a 3000-token prompt joins and is prefilled in chunks of at most
the step's token budget (`max_step_tokens`, less the decode's token) while the decode goes on. For
each budget: the gaps between the decode's tokens before the prompt joins and while it does
(median and worst), their ratio, and how long the prompt waited for its first token. The tiny
preset with 4096 positions, float32, the in-process engine: the gaps are the engine's own.

    python -m benchmarks.chunked_prefill [--budgets 8,16,64,256,8192] [--prompt-len 3000]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from benchmarks.common import save
from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from router_service.engine import local_engine
from router_service.sampling import SamplingParams


async def joining(engine, prompt: list[int], before: int = 60) -> dict:
    """The decode's gaps alone and while the prompt is being prefilled, and the prompt's wait."""
    gaps, last, long, joined_at, first_at = [], None, None, None, None

    async def join():
        nonlocal first_at
        async for _ in engine.generate(prompt, SamplingParams(max_new_tokens=2)):
            first_at = first_at or time.perf_counter()

    async for _ in engine.generate([1, 2, 3], SamplingParams(max_new_tokens=before + 20 + len(prompt))):
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last, long is not None and first_at is None))
        last = now
        if long is None and len(gaps) == before:
            long, joined_at = asyncio.ensure_future(join()), now
        if long is not None and long.done() and len(gaps) > before + 20:
            break
    await long
    alone = [g for g, _ in gaps[10:before]]  # after the first steps' warm-up
    during = [g for g, joining_now in gaps if joining_now]
    return {"alone_p50_ms": statistics.median(alone) * 1e3, "joining_p50_ms": statistics.median(during) * 1e3,
            "joining_max_ms": max(during) * 1e3, "ratio_p50": statistics.median(during) / statistics.median(alone),
            "joining_steps": len(during), "prompt_ttft_ms": (first_at - joined_at) * 1e3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="8,16,64,256,8192", help="max_step_tokens values")
    p.add_argument("--prompt-len", type=int, default=3000)
    p.add_argument("--name", default="chunked_prefill")
    a = p.parse_args(argv)
    cfg = preset("tiny").replace(max_position_embeddings=4096)
    prompt = [(7 * i) % (cfg.vocab_size - 3) + 3 for i in range(a.prompt_len)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, cfg, random_weights(cfg, seed=0))
        for budget in map(int, a.budgets.split(",")):
            engine = local_engine(d, max_step_tokens=budget, kv_tokens=2 * cfg.max_position_embeddings)
            asyncio.run(joining(engine, prompt))  # first use of these sizes: not measured
            rows.append({"max_step_tokens": budget, "prompt_len": a.prompt_len,
                         **asyncio.run(joining(engine, prompt))})
            print(rows[-1], flush=True)
    save(a.name, rows, {"preset": "tiny", "max_position_embeddings": cfg.max_position_embeddings},
         ["max_step_tokens", "prompt_len", "alone_p50_ms", "joining_p50_ms", "joining_max_ms", "ratio_p50",
          "joining_steps", "prompt_ttft_ms"])


if __name__ == "__main__":
    main()
