"""Question: does an MoE layer get faster, and carry more tokens, when its experts spread over
several GPUs; and what does a hot expert's second replica on a free GPU buy?

One Mixtral-8x7B layer (bf16, random weights). This process is the router: the gate, the grouped
dispatch and the weighted combine run on GPU 0. Each expert is a `python -m expert_service`
process pinned to one physical GPU the way Ray pins a replica (CUDA_VISIBLE_DEVICES), and every
expert has such a process on every GPU; a placement is which of them the dispatcher's table names.
Transport: CUDA IPC sessions and their doorbells; an expert on another GPU than the router maps the
router's buffers over the GPU link and copies its rows in and out once per call.

Placements, on a machine of G GPUs (expert e goes to the e-th GPU of the list, cyclically):
  inprocess                            every expert in this process (the reference, ratio 1)
  experts on GPU 0                     the eight expert processes share the router's GPU
  router on GPU 0, experts on 1..g     the router's GPU holds no expert (g = 1 .. G-1)
  experts on GPUs 0..g-1               the router shares GPU 0 with experts (g = 2 .. G)

Each runs `concurrency` layer calls of T tokens at once (1: the layer's latency; more: as several
micro-batches or routers would), timed per round: ms, tokens/s, ratio to in-process at the same T
and concurrency. Scaling efficiency = tokens/s / (g x tokens/s of the same family on one GPU).
Hot expert (G >= 2): tokens are shifted along expert 3's gate row until it is in the top-2 of
--hot-share of them; the layer with every expert on GPU 0, then with a second replica of expert 3
on GPU 1, whose rows the dispatcher then splits between the two. Expert processes on one GPU
time-slice it unless the NVIDIA MPS daemon runs (docs/deploy.md); say which with --note.
`max_abs_diff`/`rel_err` compare with in-process: a hot expert's rows split between two replicas
run as GEMMs of other row counts, whose bf16 rounding differs (rel_err about 1e-3 or less).

    python -m benchmarks.multi_gpu [--tokens 1024,4096] [--concurrency 1,4] [--hot-share 0.9] [--note TEXT]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile

import torch

from benchmarks.common import measure, run, save
from benchmarks.moe_layer import layer_checkpoint
from expert_service.experts import ExpertShard
from expert_service.processes import ExpertServers
from router_service import model
from router_service.dispatch import InProcessDispatcher, RemoteDispatcher, remote_dispatcher

HOT = 3  # the expert made hot


def placements(n_gpus: int) -> list[tuple[str, str, list[int]]]:
    """(label, family, GPUs holding experts): the family's one-GPU placement is its scaling base."""
    out = [("experts on GPU 0", "shared", [0])]
    out += [(f"router on GPU 0, experts on GPU{'s 1-' if g > 1 else ' '}{g}", "router alone", list(range(1, g + 1)))
            for g in range(1, n_gpus)]
    out += [(f"experts on GPUs 0-{g - 1}", "shared", list(range(g))) for g in range(2, n_gpus + 1)]
    return out


def skew(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, expert: int, share: float) -> tuple[torch.Tensor, float]:
    """x shifted along the expert's gate row until the expert is in the top-k of `share` of the
    tokens (bisection on the shift); returns it and the share reached."""
    u_H = gate_EH[expert].float() / gate_EH[expert].float().norm()

    def frac(c: float) -> float:
        _, idx_TK = model.route((x_TH.float() + c * u_H).to(x_TH.dtype), gate_EH, top_k)
        return (idx_TK == expert).any(-1).float().mean().item()
    lo, hi = 0.0, 1.0
    while frac(hi) < share and hi < 1e4:
        hi *= 2
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if frac(mid) < share else (lo, mid)
    return (x_TH.float() + hi * u_H).to(x_TH.dtype), frac(hi)


async def _bench(ckpt, a) -> list[dict]:
    cfg, dev, dtype = ckpt.config, torch.device("cuda:0"), torch.bfloat16
    n_gpus, E = torch.cuda.device_count(), cfg.n_experts
    gate = model.DenseWeights.load(ckpt).layers[0].gate.to(dev, dtype)
    inproc = InProcessDispatcher(ExpertShard.load(ckpt, [(0, e) for e in range(E)], device=dev, dtype=dtype))
    name = {(e, g): f"expert-{e}@gpu{g}" for e in range(E) for g in range(n_gpus)}
    servers = ExpertServers(ckpt.dir, {n: [e] for (e, _), n in name.items()}, device="cuda", dtype="bfloat16",
                            gpus={n: g for (_, g), n in name.items()})
    shard_of = {(0, e): f"expert-{e}" for e in range(E)}

    def dispatcher(table: dict[str, list[str]]) -> RemoteDispatcher:
        async def lookup():
            return table
        return remote_dispatcher(shard_of, lookup, channel="cuda_ipc")

    def spread(gpus: list[int]) -> dict[str, list[str]]:
        return {f"expert-{e}": [servers.addresses[name[e, gpus[e % len(gpus)]]]] for e in range(E)}

    runs = [("inprocess", "inprocess", [0], inproc)] + [(label, family, gpus, dispatcher(spread(gpus)))
                                                         for label, family, gpus in placements(n_gpus)]
    rows = []
    try:
        for T in a.tokens:
            for C in a.concurrency:
                xs = [torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T * 100 + i)).to(dev, dtype)
                      for i in range(C)]
                rows += await _measure(runs, xs, gate, cfg, {"T": T, "concurrency": C})
        if n_gpus >= 2:
            before = spread([0])
            after = dict(before, **{f"expert-{HOT}": before[f"expert-{HOT}"] + [servers.addresses[name[HOT, 1]]]})
            hot_runs = [("hot: inprocess", "hot", [0], inproc),
                        ("hot: experts on GPU 0", "hot", [0], dispatcher(before)),
                        (f"hot: experts on GPU 0, expert {HOT} also on GPU 1", "hot", [0, 1], dispatcher(after))]
            runs += hot_runs[1:]
            for T in a.tokens:
                x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(dev, dtype)
                x, share = skew(x, gate, cfg.top_k, HOT, a.hot_share)
                rows += await _measure(hot_runs, [x], gate, cfg, {"T": T, "concurrency": 1,
                                                                   "hot_rows": round(share / cfg.top_k, 3)})
    finally:
        for _, _, _, d in runs:
            if hasattr(d, "close"):
                await d.close()
        servers.close()
    return _efficiency(rows)


async def _measure(runs, xs, gate, cfg, common: dict) -> list[dict]:
    refs = [await model.moe(0, x, gate, cfg.top_k, runs[0][3]) for x in xs]
    rows, base = [], None
    for label, family, gpus, disp in runs:
        outs = [await model.moe(0, x, gate, cfg.top_k, disp) for x in xs]
        err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, refs))
        rel = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, refs))

        async def layer_calls():
            await asyncio.gather(*(model.moe(0, x, gate, cfg.top_k, disp) for x in xs))
        r = await measure(layer_calls, sync=torch.cuda.synchronize)
        base = base or r["ms"]
        tokens = sum(x.shape[0] for x in xs)
        rows.append({**common, "placement": label, "family": family, "expert_gpus": len(gpus), "ms": r["ms"],
                     "p90_ms": r["p90_ms"], "tokens_per_s": tokens / r["ms"] * 1e3, "ratio": r["ms"] / base,
                     "max_abs_diff": err, "rel_err": rel})
        print(rows[-1], flush=True)
    return rows


def _efficiency(rows: list[dict]) -> list[dict]:
    """tokens/s over (GPUs holding experts x the family's one-GPU tokens/s) at the same T and concurrency."""
    one = {(r["T"], r["concurrency"], r["family"]): r["tokens_per_s"] for r in rows if r["expert_gpus"] == 1}
    for r in rows:
        base = one.get((r["T"], r["concurrency"], r["family"]))
        if base and r["family"] in ("shared", "router alone"):
            r["scaling_eff"] = r["tokens_per_s"] / (r["expert_gpus"] * base)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--hot-share", type=float, default=0.9, help="share of tokens with the hot expert in their top-k")
    p.add_argument("--name", default="multi_gpu")
    p.add_argument("--note", help="what this run is (e.g. whether the MPS daemon ran)")
    a = p.parse_args(argv)
    a.tokens = [int(t) for t in a.tokens.split(",")]
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA GPUs (two or more for anything but the one-GPU placements)")
    with tempfile.TemporaryDirectory() as d:
        ckpt = layer_checkpoint(a.preset, d, torch.bfloat16)
        rows = run(_bench(ckpt, a))
    save(a.name, rows, {"preset": a.preset, "dtype": "bfloat16", "gpus": torch.cuda.device_count(),
                        "transport": "cuda_ipc", **({"note": a.note} if a.note else {})},
         ["T", "concurrency", "placement", "expert_gpus", "hot_rows", "ms", "p90_ms", "tokens_per_s", "ratio",
          "scaling_eff", "max_abs_diff", "rel_err"])


if __name__ == "__main__":
    main()
