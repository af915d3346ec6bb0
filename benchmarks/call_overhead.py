"""Question: what does one expert call cost beyond its math, alone and eight at once?

Expert servers (`python -m expert_service`, one expert each) on this machine, called from this
process through its channel (router_service/channels):
- `info`: the Info RPC, an empty round trip (gRPC alone);
- `forward`: a Forward of `rows` rows (bytes in a gRPC message, or through a `cuda_ipc`/`shm`
  session, the envelope through its ring), to one server, one call after another;
- `envelope only`: a session's call of no rows (the ring's round trip, on a GPU with its two
  CUDA IPC events);
- `forward x8`: the same to eight servers at once (one MoE layer's scatter), one after another
  (`sequential`) or concurrently (`concurrent`), for all eight;
- `math`: the same expert's FFN on the same rows in this process, on as many CPU threads as a
  server has: what a call costs beyond it is the crossing.

Latencies are `p50_us` and `p99_us` over up to 5000 calls (at most about 2 s each).

    python -m benchmarks.call_overhead [--device cuda] [--rows 1,8,64] [--server-args="--no-cuda-graphs"]
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
from router_service.channels.by_name import connector


async def _probe(addresses: list[str], hidden: int, rows_list: list[int], device: str, dtype,
                 shard: ExpertShard) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else None
    out = []

    async def timed(what, fn, **extra):
        r = await measure(fn, sync=sync, budget_s=2.0, warmup=20, max_iters=5000)
        out.append({"call": what, **extra, "p50_us": r["ms"] * 1e3, "p99_us": r["p99_ms"] * 1e3, "iters": r["iters"]})
        print(out[-1], flush=True)

    for n in rows_list:
        x = torch.randn(n, hidden, device=device, dtype=dtype)

        async def math():
            shard.forward(x, [(0, 0, n)])
        await timed("math", math, transport="in-process", rows=n)
    for kind in ["grpc", "cuda_ipc"] if device == "cuda" else ["grpc", "shm"]:
        connect = connector(kind)
        clients = [connect("expert", a) for a in addresses]
        transport = "bytes" if kind == "grpc" else kind
        if kind == "grpc":
            await timed("info", lambda: clients[0].info(timeout=30), transport="grpc")
        else:
            x0 = torch.empty(0, hidden, device=device, dtype=dtype)
            await timed("envelope only", lambda: clients[0].forward(x0, [], timeout=60), transport=kind, rows=0)
        for n in rows_list:
            x = torch.randn(n, hidden, device=device, dtype=dtype)
            await timed("forward", lambda: clients[0].forward(x, [(0, 0, n)], timeout=60), transport=transport, rows=n)

            async def sequential():
                for i, c in enumerate(clients):
                    await c.forward(x, [(0, i, n)], timeout=60)

            async def concurrent():
                await asyncio.gather(*(c.forward(x, [(0, i, n)], timeout=60) for i, c in enumerate(clients)))
            await timed("forward x8 sequential", sequential, transport=transport, rows=n)
            await timed("forward x8 concurrent", concurrent, transport=transport, rows=n)
        for c in clients:
            await c.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--name", default=None, help="results file name (default: call_overhead__DEVICE)")
    p.add_argument("--server-args", default="", help="extra arguments for the expert servers, e.g. --no-cuda-graphs")
    p.add_argument("--note", help="what this run changes (shown in the report)")
    a = p.parse_args(argv)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as d:
        ckpt = layer_checkpoint(a.preset, d, getattr(torch, dtype))
        n = ckpt.config.n_experts
        with ExpertServers(d, {f"expert-{e}": [e] for e in range(n)}, device=a.device, dtype=dtype,
                           args=a.server_args.split()) as servers:
            threads = torch.get_num_threads()
            torch.set_num_threads(servers.threads)
            shard = ExpertShard.load(ckpt, [(0, 0)], device=a.device, dtype=getattr(torch, dtype))
            rows = run(_probe(list(servers.addresses.values()), ckpt.config.hidden_size,
                              [int(r) for r in a.rows.split(",")], a.device, getattr(torch, dtype), shard))
            torch.set_num_threads(threads)
    save(a.name or f"call_overhead__{a.device}", rows, {"preset": a.preset, "dtype": dtype, "note": a.note,
                                                        "server_args": a.server_args or None},
         ["call", "transport", "rows", "p50_us", "p99_us", "iters"])


if __name__ == "__main__":
    main()
