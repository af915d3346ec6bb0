"""`make demo` (`moe-serve demo`): bring the cluster up, stream a few generations through the
gateway, print how many tokens each expert got, and bring it down again (`local` runs the same in
this process)."""
from __future__ import annotations

import asyncio

from moe_core.tokenizer import load_tokenizer
from router_service.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "A mixture of experts", "Hello, world!"]
PARAMS = SamplingParams(max_new_tokens=16, temperature=0.8, seed=0)


def _show(prompt, stream):
    print(f"\nprompt: {prompt!r}\n  ", end="", flush=True)
    for text, reason in stream:
        print(text, end="", flush=True)
    print(f"  [{reason}]")


def _counts(rows, replicas=None):
    print("\ntokens routed per expert (rows: layers):")
    for layer, row in enumerate(rows):
        print(f"  layer {layer}: " + " ".join(f"{n:5d}" for n in row))
    if replicas:
        print("replicas per expert deployment: " + ", ".join(f"{k}={v}" for k, v in replicas.items()))


def _about(model: str) -> None:
    from moe_core.config import MoEConfig
    cfg = MoEConfig.from_dir(model)
    print(f"model {model}: {cfg.n_layers} layers, {cfg.n_experts} experts, top-{cfg.top_k}. Its weights are random "
          "(written by `moe-serve init-model` with a fixed seed), so the text below is noise, the same on every run.")


def remote(model: str, port: int):
    from moe.v1 import gateway_pb2_grpc
    from moe_serve import client
    from moe_serve.launcher import down, up

    _about(model)
    print("starting a local Ray cluster and deploying (about a minute on a small machine)...", flush=True)
    try:
        info = up(model=model, port=port, progress=lambda line: print(f"  {line}", flush=True))
        print(f"gateway healthy at {info['address']}")
        stub = gateway_pb2_grpc.GatewayStub(client.channel(info["address"]))
        for prompt in PROMPTS:
            chunks = stub.Generate(client.request(None, prompt, PARAMS), timeout=120)
            _show(prompt, ((c.text, c.finish_reason) for c in chunks))
        s = client.stats(info["address"])
        _counts([list(layer.tokens_per_expert) for layer in s.layers], {d.name: d.replicas for d in s.deployments})
    finally:
        print("\nshutting down:", down())


def local(model: str):
    from router_service.engine import local_engine

    _about(model)
    engine, tok = local_engine(model), load_tokenizer(model)

    async def stream(ids):
        async for token, reason in engine.generate(ids, PARAMS):
            yield tok.decode([token]), reason

    for prompt in PROMPTS:
        async def collect():
            return [item async for item in stream(tok.encode(prompt).ids)]
        _show(prompt, asyncio.run(collect()))
    _counts(engine.stats.counts.tolist())
