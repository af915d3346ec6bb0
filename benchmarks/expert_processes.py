"""Question: what does spreading the experts over more processes cost on this machine?

One decode step's expert work (every layer; every expert gets `--rows` rows, as at batch
rows * n_experts / top_k) against the preset's experts split over 1, 2, 4 and 8 expert servers
(`python -m expert_service`, one torch thread each, the experts of a server one after another),
called as the router calls them: each layer's calls to all servers at once, through /dev/shm
sessions. `in-process` is the same math in this process on one thread. `step_ms` = wall time of
the step (median); `experts_cpu_ms` = CPU time the servers spent per step (from /proc);
`cpu_vs_math` = that over the in-process math's CPU time, so 1.0 means splitting cost nothing
beyond the math.

    python -m benchmarks.expert_processes [--preset bench] [--rows 1,8] [--servers 1,2,4,8] [--steps 20]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import torch

from benchmarks.common import process_cpu_s, run, save
from expert_service.experts import ExpertShard
from expert_service.processes import ExpertServers
from moe_core.checkpoint import Checkpoint, all_pairs, random_weights, write_checkpoint
from moe_core.config import preset
from router_service.channels.by_name import connector


async def _served(servers: ExpertServers, split: list[list[int]], cfg, rows: int, steps: int) -> dict:
    connect = connector("shm")
    clients = [connect(name, a) for name, a in servers.addresses.items()]
    xs = [torch.randn(rows * len(experts), cfg.hidden_size) for experts in split]

    async def step():
        for layer in range(cfg.n_layers):
            await asyncio.gather(*(c.forward(x, [(layer, e, rows) for e in experts], timeout=60)
                                   for c, x, experts in zip(clients, xs, split)))
    for _ in range(3):  # sessions attached, first-use paths taken
        await step()
    pids = [p.pid for p in servers.procs]
    cpu0, walls = sum(map(process_cpu_s, pids)), []
    for _ in range(steps):
        t0 = time.perf_counter()
        await step()
        walls.append(time.perf_counter() - t0)
    cpu = (sum(map(process_cpu_s, pids)) - cpu0) / steps
    for c in clients:
        await c.close()
    return {"step_ms": statistics.median(walls) * 1e3, "experts_cpu_ms": cpu * 1e3}


def in_process_ms(ckpt: Checkpoint, rows: int, steps: int) -> float:
    """CPU time of one step's expert math in this process, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    shard = ExpertShard.load(ckpt, all_pairs(ckpt.config))
    x = torch.randn(rows, ckpt.config.hidden_size)
    t0 = time.process_time()
    for _ in range(steps):
        for layer, expert in all_pairs(ckpt.config):
            shard.forward(x, [(layer, expert, rows)])
    torch.set_num_threads(threads)
    return (time.process_time() - t0) / steps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--rows", default="1,8", help="rows per expert per layer")
    p.add_argument("--servers", default="1,2,4,8", help="expert server counts (each divides the experts)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--name", default="expert_processes")
    a = p.parse_args(argv)
    cfg = preset(a.preset)
    servers = [int(s) for s in a.servers.split(",")]
    if any(cfg.n_experts % n for n in servers):
        p.error(f"--servers: each count must divide the preset's {cfg.n_experts} experts")
    out = []
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, cfg, random_weights(cfg, seed=0))
        ckpt = Checkpoint(d)
        for rows in [int(r) for r in a.rows.split(",")]:
            math_ms = in_process_ms(ckpt, rows, max(2, a.steps // 4))
            out.append({"rows": rows, "servers": 0, "system": "in-process", "step_ms": math_ms,
                        "experts_cpu_ms": math_ms, "cpu_vs_math": 1.0})
            print(out[-1], flush=True)
            for n in servers:
                per = cfg.n_experts // n
                split = [list(range(i * per, (i + 1) * per)) for i in range(n)]
                with ExpertServers(d, {f"experts-{i}": experts for i, experts in enumerate(split)}, threads=1) as s:
                    r = run(_served(s, split, cfg, rows, a.steps))
                out.append({"rows": rows, "servers": n, "system": "served (shm)", **r,
                            "cpu_vs_math": r["experts_cpu_ms"] / math_ms})
                print(out[-1], flush=True)
    save(a.name, out, {"preset": a.preset, "layers": cfg.n_layers, "experts": cfg.n_experts,
                       "steps": a.steps}, ["rows", "servers", "system", "step_ms", "experts_cpu_ms", "cpu_vs_math"])


if __name__ == "__main__":
    main()
