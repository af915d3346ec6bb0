"""`python -m expert_service`: one ExpertService replica without Ray, for development and benchmarks.

Prints one JSON line with the bound address once it serves; stops gracefully on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from moe_core.config import FLOAT_DTYPES


def _ids(text: str, n: int, what: str) -> list[int]:
    if text == "all":
        return list(range(n))
    try:
        ids = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--{what} must be 'all' or comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < n]
    if not ids or bad:
        raise ValueError(f"--{what} {text!r}: the model has {what} 0..{n - 1}")
    return ids


async def serve(a) -> None:
    from moe_core.config import MoEConfig

    # Bad ids fail here, before torch is imported (seconds on a small machine).
    cfg = MoEConfig.from_dir(a.model)
    layers, experts = _ids(a.layers, cfg.n_layers, "layers"), _ids(a.experts, cfg.n_experts, "experts")
    pairs = [(L, E) for L in layers for E in experts]

    import torch

    from expert_service.experts import ExpertShard
    from expert_service.server import ExpertServicer, start_server
    from moe_core.checkpoint import Checkpoint

    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ValueError(f"--device {a.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: torch sees no CUDA device here")
    # CPU threads for torch: after each parallel region OpenMP's threads spin a while, so several
    # servers with a thread per core each keep one another off the cores (measured: benchmarks/call_overhead).
    threads = a.threads or (1 if device.type == "cuda" else None)
    if threads:
        torch.set_num_threads(threads)
    shard = ExpertShard.load(Checkpoint(a.model), pairs, device=device, dtype=getattr(torch, a.dtype))
    # The receive limit follows from max_rows (the largest real call); clients prove themselves with the
    # data-plane key (moe_core/auth.py: MOE_SERVE_DATA_KEY, Ray's token, or the per-user key file).
    servicer = ExpertServicer(shard, max_rows=a.max_rows, cuda_graphs=a.cuda_graphs)
    server, port = await start_server(servicer, host=a.host, port=a.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"host": a.host, "port": port, "pairs": len(pairs), "device": a.device, "dtype": a.dtype}),
          flush=True)
    await stop.wait()
    await server.stop(a.grace)  # refuses new calls, lets in-flight ones finish for up to `grace` s
    servicer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m expert_service", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face Mixtral model directory")
    p.add_argument("--experts", default="all", help="expert ids to serve, e.g. 0,1 (default all)")
    p.add_argument("--layers", default="all", help="layer ids to serve, e.g. 0,1 (default all)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(FLOAT_DTYPES), help="compute dtype")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --device cuda, else torch's; "
                                               "give several servers on one machine cores / servers)")
    p.add_argument("--max-rows", type=int, default=1 << 14, help="rows per call (sets the receive limit)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on shutdown")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay CUDA graphs for decode-size calls on same-node CUDA buffers (default: on)")
    a = p.parse_args(argv)
    try:
        asyncio.run(serve(a))
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"expert_service: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
