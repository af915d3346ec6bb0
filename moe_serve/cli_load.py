"""`moe-serve load`: bounded load against a gateway, optionally skewed towards one expert; prints
a JSON report (p50/p99 latency, tokens/s, errors)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    from moe_serve.cli import address
    s = sub.add_parser("load", help="send load to a gateway for a while (optionally making one expert hot), "
                                    "report latency, tokens/s and errors")
    s.add_argument("--address", type=address, default="127.0.0.1:9000", help="gateway HOST[:PORT]")
    s.add_argument("--rps", type=float, help="requests per second offered (default: closed loop, "
                                          "--concurrency requests always in flight)")
    s.add_argument("--duration", type=float, default=30.0, help="seconds of load; then it stops")
    s.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    s.add_argument("--skew", type=float, default=0.0, help="fraction of requests with hot prompts, 0..1")
    s.add_argument("--hot-expert", type=int, default=0, help="the expert hot prompts go to")
    s.add_argument("--model", help="model directory: scores tokens for hot prompts (needed with --skew) "
                                   "and sets the vocabulary of uniform prompts")
    s.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_load)


def cmd_load(a) -> None:
    import asyncio

    from moe_serve.loadgen import COLD_VOCAB, hot_tokens, run_load

    if not 0 <= a.skew <= 1:
        raise ValueError(f"skew must be in [0, 1], got {a.skew}")
    if a.skew > 0 and not a.model:
        raise ValueError("--skew needs --model DIR to find prompts that route to the hot expert")
    hot, vocab = None, COLD_VOCAB
    if a.model:
        from moe_core.config import MoEConfig
        vocab = MoEConfig.from_dir(a.model).vocab_size
        if a.skew > 0:
            hot = hot_tokens(a.model, a.hot_expert, seed=a.seed)
    report = asyncio.run(run_load(a.address, rps=a.rps, duration_s=a.duration, concurrency=a.concurrency,
                                  max_new_tokens=a.max_new_tokens, prompt_len=a.prompt_len, skew=a.skew,
                                  hot=hot, vocab_size=vocab, timeout_s=a.timeout, seed=a.seed))
    if hot:
        report |= {"hot_expert": a.hot_expert, "hot_tokens": hot}
    print(json.dumps(report))
