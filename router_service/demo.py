"""`make demo`: generate from the model and show it streaming, with the experts each token used."""
from __future__ import annotations

import argparse
import asyncio

from moe_core.tokenizer import load_tokenizer
from router_service.engine import local_engine
from router_service.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "A mixture of experts", "Hello, world!"]


async def _demo(model_dir: str):
    engine = local_engine(model_dir)
    tok = load_tokenizer(model_dir)
    for text in PROMPTS:
        ids = tok.encode(text).ids
        print(f"\nprompt: {text!r} -> {ids}")
        async for token, reason in engine.generate(ids, SamplingParams(max_new_tokens=16, temperature=0.8, seed=0)):
            print(f"  token {token:4d} {tok.decode([token])!r}" + (f"  [{reason}]" if reason else ""), flush=True)
    print("\ntokens routed per expert (rows: layers):")
    for layer, row in enumerate(engine.stats.counts):
        print(f"  layer {layer}: " + " ".join(f"{n:4d}" for n in row))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    asyncio.run(_demo(p.parse_args().model))


if __name__ == "__main__":
    main()
