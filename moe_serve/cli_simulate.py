"""`moe-serve simulate`: replicas per expert, GPUs and tokens/s predicted from a routing trace
(moe_serve/simulate.py does the work)."""
from __future__ import annotations

import json

from moe_serve.record import read_trace
from moe_serve.simulate import SHAPES, load_costs, render, simulate


def add_parser(sub) -> None:
    s = sub.add_parser("simulate", help="predict replicas per expert, GPUs and tokens/s from a routing trace")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="msgpack trace from `moe-serve record`")
    src.add_argument("--zipf", type=float, help="synthetic trace: expert popularity ~ 1/rank**S")
    s.add_argument("--shape", default="mixtral-8x7b", choices=SHAPES)
    s.add_argument("--gpus", type=int, required=True, help="GPUs available")
    s.add_argument("--target", type=float, help="tokens/s wanted: also report the GPUs needed (up to --gpus)")
    s.add_argument("--batch-tokens", type=int, default=512, help="tokens per router step")
    s.add_argument("--context", type=int, default=1024, help="mean tokens of context each new token attends to")
    s.add_argument("--transport", help="the wire: a transport the costs' benchmark measured (grpc, shm, "
                                       "cuda_ipc, ...), else a figure: grpc 0.15 GB/s, pinned 25 GB/s")
    s.add_argument("--wire-gbs", type=float, help="wire bandwidth in GB/s each way, overrides --transport")
    s.add_argument("--costs", help="costs JSON, a benchmarks/moe_layer.py result, or `defaults` for the "
                                   "built-in estimates (default: the cost table shipped with the package)")
    s.add_argument("--steps", type=int, default=200, help="steps of the synthetic trace")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shuffle-layers", action="store_true", help="synthetic: rank experts afresh in each layer")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=_cmd_simulate)


def _cmd_simulate(a) -> None:
    trace = read_trace(a.trace) if a.trace else None
    shape = a.shape
    out = simulate(shape=shape, gpus=a.gpus, trace=trace, zipf=a.zipf, batch_tokens=a.batch_tokens, context=a.context,
                   steps=a.steps, seed=a.seed, shuffle_layers=a.shuffle_layers, target_tokens_per_s=a.target,
                   costs=load_costs(a.costs, transport=a.transport, wire_gbs=a.wire_gbs))
    print(json.dumps(out) if a.json else render(out))
