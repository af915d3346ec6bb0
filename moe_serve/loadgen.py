"""A bounded load generator for the gateway (grpc.aio), and the skewed traffic that makes one
expert hot.

Requests arrive open-loop at `rps` for `duration_s` seconds, at most `concurrency` in flight (when
that many are waiting, new arrivals wait for a slot); then it waits for the stragglers and stops.
Without `rps` it runs closed-loop: `concurrency` requests always in flight, each answered one
followed at once by the next.
A fraction `skew` of the requests carries a "hot" prompt: one token repeated, chosen so that the
gate sends it to the hot expert. A prompt of one repeated token routes exactly like that token
alone, at every layer (causal attention over identical values returns that value), so scoring
candidate tokens with one-token forwards through the local model predicts the routing of the
whole prompt. The rest carry uniform random token ids.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import grpc
import numpy as np
import torch

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_serve.client import OPTIONS

COLD_VOCAB = 256  # without a model, uniform prompts use ids every tokenizer here has


def expert_affinity(model_dir, expert: int, token_ids: list[int]) -> np.ndarray:
    """[tokens, 2]: for each token alone, at how many layers the gate puts `expert` in its top-k,
    and the summed gate weight it gets. Runs one-token forwards through every layer, loading one
    layer's experts at a time."""
    from expert_service.experts import ExpertShard
    from moe_core.checkpoint import Checkpoint
    from router_service import model

    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    if not 0 <= expert < cfg.n_experts:
        raise ValueError(f"hot expert {expert} is out of range: the model has {cfg.n_experts} experts")
    w = model.DenseWeights.load(ckpt)
    T, D = len(token_ids), cfg.dim_per_head
    hits, weight = np.zeros(T), np.zeros(T)
    F = torch.nn.functional
    with torch.no_grad():
        h_TH = F.embedding(torch.tensor(token_ids), w.embed)
        for L, lw in enumerate(w.layers):
            # Attention of a lone position: softmax over one key is 1, so each query head returns
            # its kv head's value (RoPE touches q and k only). All tokens at once, no cache.
            v_TGD = F.linear(model.rms_norm(h_TH, lw.attn_norm, cfg.rms_norm_eps), lw.wv).view(T, -1, D)
            out_TQD = v_TGD.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
            h_TH = h_TH + F.linear(out_TQD.reshape(T, -1), lw.wo)
            x_TH = model.rms_norm(h_TH, lw.moe_norm, cfg.rms_norm_eps)
            w_TK, idx_TK = model.route(x_TH, lw.gate, cfg.top_k)
            picked = (idx_TK == expert)
            hits += picked.any(dim=1).numpy()
            weight += (w_TK * picked).sum(dim=1).numpy()
            if L + 1 < cfg.n_layers:  # the next layer's input needs this layer's experts
                shard = ExpertShard.load(ckpt, [(L, e) for e in range(cfg.n_experts)])
                order = idx_TK.flatten().argsort(stable=True)
                counts = torch.bincount(idx_TK.flatten(), minlength=cfg.n_experts).tolist()
                y = shard.forward(x_TH[order // cfg.top_k], [(L, e, n) for e, n in enumerate(counts)])
                out = torch.zeros_like(x_TH)
                out.index_add_(0, order // cfg.top_k, y * w_TK.flatten()[order, None])
                h_TH = h_TH + out
    return np.stack([hits, weight], axis=1)


def hot_tokens(model_dir, expert: int, *, count: int = 16, candidates: int = 2048, seed: int = 0) -> list[int]:
    """The `count` token ids (of up to `candidates` scored) that route to `expert` at the most layers."""
    from moe_core.config import MoEConfig
    vocab = MoEConfig.from_dir(model_dir).vocab_size
    ids = list(range(vocab)) if vocab <= candidates else sorted(random.Random(seed).sample(range(vocab), candidates))
    score = expert_affinity(model_dir, expert, ids)
    order = np.lexsort((-score[:, 1], -score[:, 0]))  # most layers first, then most gate weight
    return [ids[i] for i in order[:count]]


def _percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run_load(address: str, *, rps: float | None, duration_s: float, concurrency: int = 16,
                   max_new_tokens: int = 8, prompt_len: int = 32, skew: float = 0.0,
                   hot: list[int] | None = None, vocab_size: int = COLD_VOCAB, timeout_s: float = 60.0,
                   seed: int = 0, stop: asyncio.Event | None = None) -> dict:
    """Sends Complete requests as described above; returns the report (latencies in seconds).
    Setting `stop` ends the arrivals early (the requests in flight still finish)."""
    if (rps is not None and rps <= 0) or duration_s <= 0 or concurrency < 1:
        raise ValueError("rps and duration must be > 0 and concurrency >= 1")
    if not 0 <= skew <= 1:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    if skew > 0 and not hot:
        raise ValueError("skewed load needs hot token ids")
    if max_new_tokens < 1 or prompt_len < 1:
        raise ValueError("max_new_tokens and prompt_len must be >= 1")
    rng = random.Random(seed)
    stop = stop or asyncio.Event()
    latencies, errors = [], Counter()
    sent = hot_sent = generated = prompt_tokens = 0
    slots = asyncio.Semaphore(concurrency)
    sampling = gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens)

    async def one(stub, prompt):
        nonlocal generated, prompt_tokens
        t0 = time.perf_counter()
        try:
            r = await stub.Complete(gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling),
                                    timeout=timeout_s)
            latencies.append(time.perf_counter() - t0)
            generated += len(r.token_ids)
            prompt_tokens += len(prompt)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] += 1
        finally:
            slots.release()

    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        tasks = []
        start = time.perf_counter()
        end = start + duration_s
        while True:
            due = start + sent / rps if rps else time.perf_counter()
            if due >= end or stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))
            await slots.acquire()
            if time.perf_counter() >= end or stop.is_set():
                slots.release()
                break
            if rng.random() < skew:
                prompt, hot_sent = [hot[hot_sent % len(hot)]] * prompt_len, hot_sent + 1
            else:
                prompt = [rng.randrange(vocab_size) for _ in range(prompt_len)]
            tasks.append(asyncio.create_task(one(stub, prompt)))
            sent += 1
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"address": address, "requests": sent, "ok": len(latencies), "failed": sum(errors.values()),
            "errors": dict(errors), "hot_requests": hot_sent, "skew": skew,
            "duration_s": round(elapsed, 3), "rps_offered": rps, "rps_achieved": round(len(latencies) / elapsed, 3),
            "latency_s": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                          "mean": float(np.mean(latencies)) if latencies else None,
                          "max": max(latencies, default=None)},
            "tokens_per_s": round(generated / elapsed, 2),
            "prompt_tokens_per_s": round(prompt_tokens / elapsed, 2)}
