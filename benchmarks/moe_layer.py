"""Question: what does moving an MoE layer's expert work off the router cost?

One MoE layer (gate, top-k, grouped dispatch, experts, weighted combine) at T tokens, through:
in-process (experts in this process), gRPC (one `python -m expert_service` per expert), and Ray
Serve handles (the Ray-native baseline; CPU runs only). ms per layer and the ratio to in-process.
Transports: inprocess, grpc (bytes in the message), shm (/dev/shm buffers), cuda_ipc (GPU buffers
shared through CUDA IPC), handle; "KIND/1" puts every expert in one server (one call per layer).

    python -m benchmarks.moe_layer [--preset bench] [--tokens 1,8,64,512,4096] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import measure, run, save
from expert_service.processes import ExpertServers
from moe_core.checkpoint import Checkpoint, random_weights, write_checkpoint
from moe_core.config import preset
from router_service import model
from router_service.dispatch import InProcessDispatcher


def layer_checkpoint(name: str, out_dir, dtype=torch.float32) -> Checkpoint:
    """One decoder layer of the preset's shape, tiny vocabulary: only the MoE block is timed."""
    cfg = preset(name).replace(n_layers=1, vocab_size=64, bos_token_id=1, eos_token_id=2)
    write_checkpoint(out_dir, cfg, random_weights(cfg, seed=0), dtype=dtype)
    return Checkpoint(out_dir)


def gemm_tflops(device, dtype, m=8192, k=4096, n=14336) -> float:
    """The plain matmul rate on this device: the ceiling the expert math is compared with."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12


async def _bench_all(ckpt, tokens, transports, device, dtype, wire_dtype):
    """The Ray Serve handle baseline runs last, on its own: a running Ray (sixteen more processes)
    would slow every other row on a small machine. Its ratio is to an in-process run measured then."""
    first = [t for t in transports if t != "handle"]
    rows = await _bench(ckpt, tokens, first, device, dtype, wire_dtype) if first else []
    if "handle" in transports:
        rows += [r for r in await _bench(ckpt, tokens, ["inprocess", "handle"], device, dtype, wire_dtype)
                 if r["transport"] == "handle" or not first]
    return sorted(rows, key=lambda r: r["T"])  # stable: each T's rows in the order measured


async def _bench(ckpt, tokens, transports, device, dtype, wire_dtype):
    from expert_service.experts import ExpertShard
    from router_service.dispatch import remote_dispatcher

    cfg = ckpt.config
    tdtype = getattr(torch, dtype)
    gate = model.DenseWeights.load(ckpt).layers[0].gate.to(device, tdtype)
    inproc = InProcessDispatcher(ExpertShard.load(ckpt, [(0, e) for e in range(cfg.n_experts)], device=device, dtype=tdtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    rows, dispatchers, cleanup = [], {"inprocess": inproc}, []
    shard_of = {(0, e): f"expert-{e}" for e in range(cfg.n_experts)}
    one = [t for t in transports if t.endswith("/1")]  # one server holding every expert: one call per layer
    if one:
        single = ExpertServers(ckpt.dir, {"experts": list(range(cfg.n_experts))}, device=device, dtype=dtype)
        cleanup.append(single.close)
        one_table = {"experts": [single.addresses["experts"]]}

        async def one_lookup():
            return one_table
        for t in one:
            kind = t.split("/")[0]
            dispatchers[t] = remote_dispatcher({k: "experts" for k in shard_of}, one_lookup, wire_dtype=wire_dtype,
                                            shared=None if kind == "grpc" else kind)
    remote = [t for t in transports if t in ("grpc", "shm", "cuda_ipc")]
    if remote:
        servers = ExpertServers(ckpt.dir, {f"expert-{e}": [e] for e in range(cfg.n_experts)}, device=device, dtype=dtype)
        cleanup.append(servers.close)
        table = {n: [a] for n, a in servers.addresses.items()}

        async def lookup():
            return table
        for t in remote:  # "grpc": bytes in the message; "shm"/"cuda_ipc": shared buffers, envelope only
            dispatchers[t] = remote_dispatcher(shard_of, lookup, wire_dtype=wire_dtype, channel=t)
    if "handle" in transports:
        dispatchers["handle"] = _handle_dispatcher(ckpt, shard_of)
        cleanup.append(_stop_ray)
    try:
        for T in tokens:
            x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, tdtype)
            ref = await model.moe(0, x, gate, cfg.top_k, inproc)
            rows.append(await _expert_math(inproc.shard, x, gate, cfg, sync))
            print(rows[-1], flush=True)
            base = None
            for name, disp in dispatchers.items():
                out = await model.moe(0, x, gate, cfg.top_k, disp)
                err = (out.float() - ref.float()).abs().max().item()
                r = await measure(lambda: model.moe(0, x, gate, cfg.top_k, disp), sync=sync)
                base = base or r["ms"]
                rows.append({"T": T, "transport": name, "ms": r["ms"], "p90_ms": r["p90_ms"],
                             "ratio": r["ms"] / base, "max_abs_diff": err,
                             "MB_each_way": T * cfg.top_k * cfg.hidden_size * x.element_size() / 1e6})
                print(rows[-1], flush=True)
    finally:
        for d in dispatchers.values():
            if hasattr(d, "close"):
                await d.close()
        for c in cleanup:
            c()
    return rows


async def _expert_math(shard, x, gate, cfg, sync) -> dict:
    """The experts alone (no gate, no transport) on the layer's routed rows, as TFLOP/s."""
    w, idx = model.route(x, gate, cfg.top_k)
    order = idx.flatten().argsort(stable=True)
    counts = torch.bincount(idx.flatten(), minlength=cfg.n_experts).tolist()
    xs = x[order // cfg.top_k]
    segs = [(0, e, n) for e, n in enumerate(counts)]

    async def math():
        shard.forward(xs, segs)
    r = await measure(math, sync=sync)
    flops = 2 * 3 * xs.shape[0] * cfg.hidden_size * cfg.intermediate_size
    return {"T": x.shape[0], "transport": "expert math only", "ms": r["ms"], "p90_ms": r["p90_ms"],
            "tflops": flops / r["ms"] / 1e9}


def _handle_dispatcher(ckpt, shard_of):
    import ray
    from ray import serve

    from expert_service.deployment import ExpertReplica
    from router_service.dispatch import remote_dispatcher

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, namespace="moe-serve")
    handles = {}
    for (L, e), name in shard_of.items():
        app = ExpertReplica.options(name=name, ray_actor_options={"num_cpus": 0}).bind(str(ckpt.dir), name, [(L, e)])
        handles[name] = serve.run(app, name=name, route_prefix=None)
    table = {name: [name] for name in handles}  # one entry per deployment: Serve picks the replica

    async def lookup():
        return table
    return remote_dispatcher(shard_of, lookup, channel="handle", handles=handles)


def _stop_ray():
    import ray
    from ray import serve

    from expert_service.directory import kill_directory
    serve.shutdown()
    kill_directory()
    ray.shutdown()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--tokens", default="1,8,64,512,4096")
    p.add_argument("--transports", default="inprocess,grpc,handle")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--wire-dtype", help="dtype on the wire (default: the tensor's)")
    p.add_argument("--name", default="moe_layer", help="results file name")
    p.add_argument("--note", help="what this variant changes (shown in the report)")
    p.add_argument("--compare-to", help="the results file this variant is compared with (default: moe_layer)")
    a = p.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    transports = a.transports.split(",")
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as d:
        ckpt = layer_checkpoint(a.preset, d, dtype)
        rows = run(_bench_all(ckpt, tokens, transports, a.device, a.dtype, a.wire_dtype))
    peak = gemm_tflops(a.device, dtype)
    for r in rows:
        if "tflops" in r:
            r["of_gemm_peak"] = r["tflops"] / peak
    save(a.name, rows, {"preset": a.preset, "device": a.device, "dtype": a.dtype, "wire_dtype": a.wire_dtype,
                        "gemm_tflops": peak, **({"note": a.note} if a.note else {}),
                        **({"compare_to": a.compare_to} if a.compare_to else {})},
         ["T", "transport", "ms", "p90_ms", "ratio", "MB_each_way", "max_abs_diff", "tflops", "of_gemm_peak"])


if __name__ == "__main__":
    main()
