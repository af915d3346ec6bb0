"""Question: how fast does the served app generate, next to transformers on the same checkpoint?

The `bench` preset (written to models/bench on first use, ~850 MB float32). transformers
`MixtralForCausalLM.generate` runs first, at batch 1, 8 and 32 (greedy, exactly --new-tokens
new tokens, EOS ignored), with whichever of its expert implementations (eager loop, grouped_mm)
was faster in an untimed warm-up at that batch size; its model is then freed. Then a real Ray
cluster comes up in this process with the app deployed (gateway, router, one deployment per
expert) and 1, 8, 32 streaming `Generate` calls go to the gateway at once over grpc.aio, with the
same prompts (greedy), after an untimed warm-up round; each token is timestamped on arrival.
Each expert keeps one replica (autoscaling off), so the figures are the data path's.

tokens/s = new tokens of all requests / wall time from sending to the last token (prefill
included, as in `generate`). TPOT = gap between consecutive tokens of one request (p50, p99 over
all gaps); TTFT = time to a request's first token; transformers' TPOT is the gap between its
decode steps. `ratio` = our tokens/s over transformers' at the same batch size; `match` = share of
our requests whose tokens equal transformers' (up to our EOS, where ours stops). `cores_*` =
CPU cores the app's parts kept busy during the timed round (CPU seconds over its wall time, from
/proc: router, gateway, Serve's proxy, all experts, Serve's controller, this client, other).

On GPUs (--gpus N): transformers runs on cuda:0 in --dtype, and Ray declares N GPUs: the router
takes --router-gpus of one (its engine then runs on cuda), each expert --expert-gpus (default: an
even share of the rest), all in --dtype; the router's sessions (--shared-memory auto) then keep
the rows on the GPUs.

    python -m benchmarks.e2e [--concurrency 1,8,32] [--new-tokens 64] [--prompt-len 64]
                             [--transport grpc|handle] [--shared-memory auto|off|shm|cuda_ipc] [--micro-batches N]
                             [--router-cpus N] [--gpus N --router-gpus F --expert-gpus F --dtype bfloat16]
                             [--name e2e__VARIANT]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import process_cpu_s, save
from moe_core.config import MoEConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "bench"


def ensure_model(model_dir: Path, preset_name: str = "bench", seed: int = 0) -> Path:
    """The preset's checkpoint as `moe-serve init-model` writes it, written once and reused."""
    if not (model_dir / "config.json").is_file():
        from moe_core.checkpoint import random_weights, write_checkpoint
        from moe_core.config import preset
        from moe_core.tokenizer import write_tokenizer

        cfg = preset(preset_name)
        print(f"writing the {preset_name} checkpoint to {model_dir}", flush=True)
        write_checkpoint(model_dir, cfg, random_weights(cfg, seed=seed))
        write_tokenizer(model_dir, cfg.vocab_size)
    return model_dir


def make_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, length), generator=g).tolist()


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


# ---- transformers ----

def transformers_runs(model_dir: Path, prompts: list[list[int]], batches: list[int], new_tokens: int,
                      experts: list[str], device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[list[dict], dict[int, list[list[int]]], dict]:
    """At each batch size, a short warm-up run with each experts implementation in `experts`, then the
    timed run with the one that was fastest: transformers at its best on this machine."""
    from transformers import MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging

    logging.disable_progress_bar()

    class Clock(BaseStreamer):
        """generate() calls put() once with the prompt and once per new token: one timestamp per step."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    info = {"default_experts_implementation": getattr(model.config, "_experts_implementation", None),
            "attn_implementation": model.config._attn_implementation, "threads": torch.get_num_threads()}

    def generate(ids, n, streamer=None):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)

    rows, outputs = [], {}
    for b in batches:
        ids = torch.tensor(prompts[:b], device=device)
        warm = {}
        for impl in experts:
            model.set_experts_implementation(impl)
            generate(ids, min(4, new_tokens))  # first use of a shape is slow (kernel set-up); not timed
            t0 = time.perf_counter()
            generate(ids, min(4, new_tokens))
            warm[impl] = time.perf_counter() - t0
        impl = min(warm, key=warm.get)
        model.set_experts_implementation(impl)
        clock = Clock()
        t0 = time.perf_counter()
        out = generate(ids, new_tokens, clock)
        wall = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        if new.shape[1] != new_tokens:
            raise RuntimeError(f"transformers made {new.shape[1]} new tokens, asked for {new_tokens}")
        outputs[b] = new.tolist()
        gaps = np.diff(clock.times[1:]) * 1e3  # times[0]: the prompt; then one per new token
        rows.append({"batch": b, "system": f"transformers ({impl})", "tokens": new.numel(), "wall_s": wall,
                     "tokens_per_s": new.numel() / wall, "ttft_ms": (clock.times[1] - t0) * 1e3,
                     "p50_tpot_ms": _pct(gaps, 50), "p99_tpot_ms": _pct(gaps, 99),
                     "warmup_s": {k: round(v, 3) for k, v in warm.items()}})
        print(rows[-1], flush=True)
    del model
    gc.collect()
    return rows, outputs, info


# ---- the served app ----

async def _stream(stub, ids: list[int], new_tokens: int, timeout: float):
    from moe.v1 import gateway_pb2

    req = gateway_pb2.GenerateRequest(prompt_token_ids=ids,
                                      sampling=gateway_pb2.SamplingParams(max_new_tokens=new_tokens))
    tokens, arrivals = [], []
    async for chunk in stub.Generate(req, timeout=timeout):
        arrivals.append(time.perf_counter())
        tokens += chunk.token_ids
    return tokens, arrivals


async def _served(address: str, prompts, batches, new_tokens, timeout) -> tuple[list[dict], dict]:
    import grpc

    from moe.v1 import gateway_pb2_grpc
    from moe_serve.client import OPTIONS

    rows, outputs = [], {}
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for b in batches:
            # warm-up round at this concurrency (connection, first-use paths), not timed
            await asyncio.gather(*(_stream(stub, p, min(4, new_tokens), timeout) for p in prompts[:b]))
            cpu0, t0 = cpu_by_role(), time.perf_counter()
            results = await asyncio.gather(*(_stream(stub, p, new_tokens, timeout) for p in prompts[:b]))
            wall = max(a[-1] for _, a in results) - t0
            cpu1 = cpu_by_role()
            gaps = np.concatenate([np.diff(a) for _, a in results]) * 1e3
            n = sum(len(t) for t, _ in results)
            outputs[b] = [t for t, _ in results]
            rows.append({"batch": b, "system": "moe-serve", "tokens": n, "wall_s": wall, "tokens_per_s": n / wall,
                         "ttft_ms": float(np.median([a[0] - t0 for _, a in results])) * 1e3,
                         "p50_tpot_ms": _pct(gaps, 50), "p99_tpot_ms": _pct(gaps, 99),
                         **{f"cores_{k.replace(' ', '_')}": round((cpu1[k] - cpu0.get(k, 0)) / wall, 2)
                            for k in sorted(cpu1)}})
            print(rows[-1], flush=True)
    return rows, outputs


ROLES = (("Router", "router"), ("Gateway", "gateway"), ("ProxyActor", "serve proxy"), (":expert-", "experts"),
         ("ServeController", "serve controller"), ("benchmarks.e2e", "client"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by this machine's processes, summed by their part in the app (from
    /proc: the Serve replicas' command lines name their deployment); the rest is "other" (Ray's
    own daemons, anything else running)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cpu = process_cpu_s(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        role = next((r for key, r in ROLES if key in cmd), "other")
        out[role] = out.get(role, 0.0) + cpu
    return out


def one_replica_each(cfg: dict, router_cpus: int = 0) -> dict:
    """Every expert at one replica, autoscaling off: replicas started mid-run would share the same
    cores (and take them while loading), so the run would measure start-ups, not the data path.
    router_cpus: CPUs the router reserves (Ray then gives its torch as many threads; 0: one)."""
    for d in cfg["applications"][0]["deployments"]:
        if d["name"].startswith("expert-"):
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
        if d["name"] == "Router" and router_cpus:
            d.setdefault("ray_actor_options", {})["num_cpus"] = router_cpus
    return cfg


def served_runs(model_dir: Path, prompts, batches, new_tokens, *, transport: str, micro_batches: int,
                router_cpus: int, timeout: float, shared_memory: str = "auto", gpus: int = 0, router_gpus: float = 0,
                expert_gpus: float = 0, dtype: str = "float32") -> tuple[list[dict], dict]:
    from moe_serve.launcher import place_on_gpus
    from tests.cluster_fixtures import running_app

    app_args = {"transport": transport, "shared_memory": shared_memory}
    if micro_batches != 1:
        app_args["micro_batches"] = micro_batches
    t0 = time.perf_counter()

    def edit(cfg):  # router_gpus, expert_gpus 0: as serve.yaml says (CPU)
        return place_on_gpus(one_replica_each(cfg, router_cpus), router_gpus=router_gpus, expert_gpus=expert_gpus,
                             dtype=dtype)
    with running_app(model_dir, num_gpus=gpus, edit=edit, **app_args) as (address, _):
        print(f"app up at {address} in {time.perf_counter() - t0:.0f} s", flush=True)
        return asyncio.run(_served(address, prompts, batches, new_tokens, timeout))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint dir (written if missing)")
    p.add_argument("--preset", default="bench", help="preset to write when --model has no checkpoint")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--transport", default="grpc", choices=["grpc", "handle"], help="the router's expert dispatcher")
    p.add_argument("--shared-memory", default="auto", choices=["auto", "off", "shm", "cuda_ipc"],
                   help="the router's same-node sessions (auto: cuda_ipc from a GPU router, else shm: rows "
                        "through shared buffers and doorbells); off: every tensor as bytes over gRPC")
    p.add_argument("--micro-batches", type=int, default=1, help="router micro-batches per step (2 = ping-pong)")
    p.add_argument("--router-cpus", type=int, default=0, help="CPUs the router replica reserves, and so its "
                                                              "torch threads (default 0: one thread)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs Ray declares (0: everything on CPU)")
    p.add_argument("--router-gpus", type=float, help="the router's GPU share (default 1 with 2+ GPUs, else 0.2)")
    p.add_argument("--expert-gpus", type=float, help="each expert's GPU share (default: the rest split evenly)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="router, experts, transformers")
    p.add_argument("--hf-experts", default="eager,grouped_mm",
                   help="transformers experts_implementation(s); with several, the fastest in a warm-up is timed")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of one request, seconds")
    p.add_argument("--name", default="e2e", help="results file name (e2e__VARIANT for a variant)")
    p.add_argument("--note", help="what this variant changes (shown in the report)")
    a = p.parse_args(argv)
    batches = [int(c) for c in a.concurrency.split(",")]
    model_dir = ensure_model(a.model.resolve(), a.preset)
    cfg = MoEConfig.from_dir(model_dir)
    prompts = make_prompts(max(batches), a.prompt_len, cfg.vocab_size)
    if a.gpus:
        a.router_gpus = a.router_gpus if a.router_gpus is not None else (1.0 if a.gpus > 1 else 0.2)
        a.expert_gpus = a.expert_gpus or (a.gpus - a.router_gpus) / cfg.n_experts

    hf_rows, hf_out, hf_info = [], {}, {}
    if not a.no_transformers:
        hf_rows, hf_out, hf_info = transformers_runs(model_dir, prompts, batches, a.new_tokens,
                                                     a.hf_experts.split(","), "cuda" if a.gpus else "cpu",
                                                     getattr(torch, a.dtype))
    ours, our_out = served_runs(model_dir, prompts, batches, a.new_tokens, transport=a.transport,
                                micro_batches=a.micro_batches, router_cpus=a.router_cpus, timeout=a.timeout,
                                shared_memory="" if a.shared_memory == "off" else a.shared_memory,
                                gpus=a.gpus, router_gpus=a.router_gpus or 0,
                                expert_gpus=a.expert_gpus or 0, dtype=a.dtype)
    rows = []
    for r in ours:
        b = r["batch"]
        hf = next((h for h in hf_rows if h["batch"] == b), None)
        if hf is not None:
            r["ratio"] = r["tokens_per_s"] / hf["tokens_per_s"]
            r["match"] = float(np.mean([t == ref[:len(t)] for t, ref in zip(our_out[b], hf_out[b])]))
            rows.append(hf)
        rows.append(r)
    shown = model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir
    meta = {"model": str(shown), "config": {k: getattr(cfg, k) for k in (
        "hidden_size", "intermediate_size", "n_layers", "n_experts", "top_k", "vocab_size")},
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "transport": a.transport,
            "shared_memory": a.shared_memory, "micro_batches": a.micro_batches, "router_cpus": a.router_cpus,
            "transformers": hf_info, "note": a.note,
            **({"dtype": a.dtype, "gpus": a.gpus, "router_gpus": a.router_gpus, "expert_gpus": a.expert_gpus}
               if a.gpus else {})}
    save(a.name, rows, meta, ["batch", "system", "tokens_per_s", "ratio", "p50_tpot_ms", "p99_tpot_ms", "ttft_ms",
                              "tokens", "wall_s", "match"]
         + sorted({k for r in rows for k in r if k.startswith("cores_")}))


if __name__ == "__main__":
    main()
