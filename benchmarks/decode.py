"""Question: how close to the HBM floor does decode run?

On a GPU at Mixtral-8x7B layer shapes (`--layers` decoder layers, random bf16 weights made on the
device), on CPU at the `bench` preset in float32. For each batch size and context (prompt length),
greedy decoding of --new-tokens tokens after the prompt, --repeats times:

- `in-process`: our engine with every expert in this process (CUDA graphs on a GPU; `eager`: the
  same without them);
- `served`: our engine calling one `python -m expert_service` process per expert over gRPC with
  same-node sessions (CUDA IPC on a GPU, /dev/shm on CPU), from a checkpoint of the same weights;
- `transformers`: `MixtralForCausalLM.generate` on the same device (random weights of its own),
  with the faster of its expert implementations.

tokens/s is decode throughput, batch / TPOT (TPOT: the median gap between a request's consecutive
tokens; p99 over all gaps); the median of the repeats, with their spread. The floor: the bytes one
decode step must read (dense weights and lm_head, the experts a batch of that size hits on average
under uniform routing, the KV cache it attends over) over the copy bandwidth measured in this run;
`floor_fraction` = tokens/s over batch / floor time. For the in-process engine with graphs,
`device_ms_per_layer` is the step's graph replayed back to back (the GPU's own time) and
`host_ms_per_layer` what the step takes beyond it (the GPU waiting for the host), both per layer.

    python -m benchmarks.decode [--layers 4] [--batches 1,8,32,64,128] [--contexts 128,2048]
                                [--new-tokens 64] [--repeats 3] [--systems transformers,in-process,eager,served]
                                [--name decode__VARIANT]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import save
from expert_service.experts import ExpertShard
from expert_service.processes import ExpertServers
from moe_core.checkpoint import all_pairs, dense_shapes, expert_keys, expert_shapes, write_checkpoint
from moe_core.config import preset
from router_service import model
from router_service.dispatch import InProcessDispatcher
from router_service.engine import Engine
from router_service.sampling import SamplingParams

STEP_TOKENS = 32768  # prompt tokens a step may prefill


def bandwidth(device) -> float:
    """Device copy bandwidth, bytes/s (read + written), of a 2 GiB copy on a GPU, 256 MiB on CPU."""
    n = (1 << 31 if device == "cuda" else 1 << 28) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(times[2:])


def floor_step_bytes(cfg, batch: int, context: int, itemsize: int) -> float:
    H, D, Q, G, I, E, K = (cfg.hidden_size, cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size,
                           cfg.n_experts, cfg.top_k)
    dense = H * D * (2 * Q + 2 * G) + E * H + 2 * H
    hit = E * (1 - (1 - K / E) ** batch)  # experts a batch hits on average, routing uniform
    kv = batch * context * 2 * G * D
    return itemsize * (cfg.n_layers * (dense + hit * 3 * H * I + kv) + cfg.vocab_size * H + H)


def random_state(cfg, device, dtype, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = dense_shapes(cfg) | expert_shapes(cfg, all_pairs(cfg))
    state = {k: (torch.randn(s, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
             for k, s in shapes.items()}
    for k in state:
        if k.endswith("norm.weight") or "layernorm" in k:
            state[k].fill_(1.0)
    return state


async def _decode(engine: Engine, prompts, new_tokens: int):
    """Arrival times of every request's tokens."""
    params = SamplingParams(max_new_tokens=new_tokens)

    async def one(p):
        times = []
        async for _ in engine.generate(p, params):
            times.append(time.perf_counter())
        return times
    return await asyncio.gather(*(one(p) for p in prompts))


async def measure(engine: Engine, prompts, new_tokens: int, repeats: int) -> dict:
    """Gaps between tokens while every request decodes: after the last prompt's first token (prefills
    may take several steps), before the first request ends."""
    await _decode(engine, prompts, 4)  # first use of these sizes (captures, kernels): not timed
    tps, gaps, steal = [], [], []
    for _ in range(repeats):
        s0 = _cpu_steal()
        arrivals = [np.array(a) for a in await _decode(engine, prompts, new_tokens)]
        s1 = _cpu_steal()
        lo, hi = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
        g = np.concatenate([np.diff(a[(a >= lo) & (a <= hi)]) for a in arrivals]) * 1e3
        tps.append(len(prompts) * 1e3 / float(np.median(g)))
        gaps.append(g)
        steal.append(round(100 * (s1[0] - s0[0]) / max(1, s1[1] - s0[1]), 2))
    g = np.concatenate(gaps)
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "p50_tpot_ms": float(np.median(g)), "p99_tpot_ms": float(np.percentile(g, 99)),
            "repeats_tokens_per_s": [round(t, 1) for t in tps], "cpu_steal_pct": steal}


def _cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat ((0, 0) where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return fields[7] if len(fields) > 7 else 0, sum(fields)


def device_ms(engine: Engine) -> float | None:
    """One replay of the largest captured decode step with the experts inside, GPU time (ms)."""
    if engine.graphs is None or engine.graphs.experts is None or not engine.graphs.buckets:
        return None
    b = engine.graphs.buckets[max(engine.graphs.buckets)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    b.graphs[0].replay()
    start.record()
    for _ in range(20):
        b.graphs[0].replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def transformers_rows(cfg, device, dtype, batches, contexts, new_tokens, repeats, seed=0) -> list[dict]:
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.manual_seed(seed)
    hf_cfg = MixtralConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    with torch.device(device):
        hf = MixtralForCausalLM(hf_cfg).to(dtype).eval()
    rows = []
    for context in contexts:
        for b in batches:
            ids = torch.randint(3, cfg.vocab_size, (b, context), device=device)

            def generate(n, streamer=None):
                with torch.inference_mode():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)
            warm = {}
            for impl in ("eager", "grouped_mm"):
                hf.set_experts_implementation(impl)
                generate(4)
                t0 = time.perf_counter()
                generate(4)
                warm[impl] = time.perf_counter() - t0
            hf.set_experts_implementation(min(warm, key=warm.get))
            tps, gaps = [], []
            for _ in range(repeats):
                clock = Clock()
                generate(new_tokens, clock)
                g = np.diff(clock.times[1:]) * 1e3  # times[0]: the prompt, then one per new token
                tps.append(b * 1e3 / float(np.median(g)))
                gaps.append(g)
            print("transformers repeats tokens/s", [round(t, 1) for t in tps], flush=True)
            g = np.concatenate(gaps)
            rows.append({"system": f"transformers ({min(warm, key=warm.get)})", "batch": b, "context": context,
                         "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps),
                         "tokens_per_s_max": max(tps), "p50_tpot_ms": float(np.median(g)),
                         "p99_tpot_ms": float(np.percentile(g, 99))})
    return rows  # the model goes with this frame


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Mixtral-8x7B has 32)")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--contexts", default="128,2048", help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default="transformers,in-process", help="any of transformers, in-process, "
                   "eager (in-process without CUDA graphs), served")
    p.add_argument("--served-batches", default="1,8,32,64")
    p.add_argument("--hf-batches", default="1,8,32,64", help="transformers' batch sizes (first context only)")
    p.add_argument("--note", help="what this run changes (shown in the report)")
    p.add_argument("--name", default=None, help="results file (default decode__<gpu>, or decode on CPU)")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    base = preset("mixtral-8x7b") if gpu else preset("bench")
    cfg = dataclasses.replace(base, n_layers=a.layers if gpu else base.n_layers, eos_token_id=None)
    batches, contexts = [int(b) for b in a.batches.split(",")], [int(c) for c in a.contexts.split(",")]
    name = a.name or (f"decode__{torch.cuda.get_device_name(0).split()[-1].lower()}" if gpu else "decode")
    bw = bandwidth(device)
    systems = a.systems.split(",")
    meta = {"note": a.note, "bandwidth_GBps": bw / 1e9, "layers": cfg.n_layers, "dtype": str(dtype).removeprefix("torch."),
            "new_tokens": a.new_tokens, "repeats": a.repeats,
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "n_layers", "n_experts",
                                                     "top_k", "n_heads", "n_kv_heads", "vocab_size")}}
    columns = ["system", "batch", "context", "tokens_per_s", "floor_fraction", "p50_tpot_ms", "p99_tpot_ms",
               "tokens_per_s_min", "tokens_per_s_max", "host_ms_per_layer", "device_ms_per_layer"]
    rows = []

    def add(row):
        floor_s = floor_step_bytes(cfg, row["batch"], row["context"], torch.finfo(dtype).bits // 8) / bw
        row["floor_fraction"] = row["tokens_per_s"] / (row["batch"] / floor_s)
        rows.append(row)
        print(row, flush=True)
        save(name, rows, meta, columns)  # after every row: a run cut short keeps what it measured

    if "transformers" in systems:
        for r in transformers_rows(cfg, device, dtype, [int(b) for b in a.hf_batches.split(",")], contexts[:1],
                                   a.new_tokens, a.repeats):
            add(r)
        gc.collect()
    state = random_state(cfg, device, dtype)
    weights = model.DenseWeights.from_state(cfg, state)
    shard = ExpertShard({(L, e): tuple(state.pop(k) for k in expert_keys(L, e)) for L, e in all_pairs(cfg)})
    gen = torch.Generator().manual_seed(1)
    modes = [("in-process", gpu)] if "in-process" in systems else []
    modes += [("in-process (eager)", False)] if "eager" in systems and gpu else []  # the same on CPU
    for context in contexts:
        for label, graphs in modes:
            engine = Engine(cfg, weights, InProcessDispatcher(shard), max_running=max(batches),
                            max_seq_len=context + a.new_tokens, kv_tokens=max(batches) * (context + a.new_tokens),
                            max_step_tokens=STEP_TOKENS, cuda_graphs=graphs)
            for b in batches:
                prompts = torch.randint(3, cfg.vocab_size, (b, context), generator=gen).tolist()
                row = {"system": label, "batch": b, "context": context,
                       **asyncio.run(measure(engine, prompts, a.new_tokens, a.repeats))}
                dev = device_ms(engine)
                if dev is not None:
                    row["device_ms_per_layer"] = dev / cfg.n_layers
                    row["host_ms_per_layer"] = max(0.0, row["p50_tpot_ms"] - dev) / cfg.n_layers
                add(row)
            del engine
            gc.collect()
    if "served" in systems:
        del shard
        gc.collect()
        served(cfg, weights, device, dtype, [int(b) for b in a.served_batches.split(",")], contexts[:1],
               a.new_tokens, a.repeats, add)


def served(cfg, weights, device, dtype, batches, contexts, new_tokens, repeats, add) -> None:
    gen = torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory() as d:
        # the same weights again (same seed), for the expert processes to load
        write_checkpoint(d, cfg, {k: _to_cpu(v) for k, v in random_state(cfg, device, dtype).items()}, dtype=dtype)
        torch.cuda.empty_cache() if device == "cuda" else None
        shards = {f"expert-{e}": [e] for e in range(cfg.n_experts)}
        with ExpertServers(d, shards, device=device, dtype=str(dtype).removeprefix("torch.")) as servers:
            table = {n: [a] for n, a in servers.addresses.items()}
            asyncio.run(_served(cfg, weights, device, table, batches, contexts, new_tokens, repeats, add, gen))


async def _served(cfg, weights, device, table, batches, contexts, new_tokens, repeats, add, gen) -> None:
    from router_service.dispatch import remote_dispatcher

    async def lookup():
        return table
    shard_of = {(L, e): f"expert-{e}" for L, e in all_pairs(cfg)}
    for context in contexts:
        disp = remote_dispatcher(shard_of, lookup, channel="cuda_ipc" if device == "cuda" else "shm")
        engine = Engine(cfg, weights, disp, max_running=max(batches), max_seq_len=context + new_tokens,
                        kv_tokens=max(batches) * (context + new_tokens), max_step_tokens=STEP_TOKENS)
        for b in batches:
            prompts = torch.randint(3, cfg.vocab_size, (b, context), generator=gen).tolist()
            add({"system": "served (one process per expert)", "batch": b, "context": context,
                 **await measure(engine, prompts, new_tokens, repeats)})
        await disp.close()


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    """Through pinned memory: pageable copies from these GPUs are slow."""
    return t if not t.is_cuda else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


if __name__ == "__main__":
    main()
