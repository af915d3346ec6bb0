"""Capacity planning: replays a routing trace (recorded, or synthetic with a Zipf skew) against a
cost model of one decode step and predicts, for a model shape on N GPUs, how many router replicas
and replicas per expert to run and the tokens/s to expect.

One router step of T tokens, with rows_e = the rows routed to expert e in a layer (T*k in all):
    router path   sum over layers of  dense(T) + wire(T*k rows) + max_e call(rows_e / k_e)
    replica busy  sum over layers of  (k_e calls + compute and wire of rows_e) / r_e
    with k_e = min(r_e, rows_e // 32) replicas sharing each call's rows, as the gRPC dispatcher does
    step          max(router path, R * busiest replica)                        (R routers share the replicas)
    tokens/s      R * T / step, averaged over the trace's steps
Every number comes from `Costs` and is printed beside the result. Each router replica and each expert
replica holds a GPU of its own. Extra replicas go to the expert whose replicas are busiest; R is the
one that maximises tokens/s. More GPUs never predict fewer tokens/s.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from moe_core.config import MoEConfig, preset
from moe_core.shards import shard_name
from moe_serve.record import Trace

SHAPES = ("mixtral-8x7b", "mixtral-8x22b")
MAX_GPUS = 1024
MAX_STEPS = 256  # longer traces are subsampled evenly
SPLIT_MIN_ROWS = 32  # ReplicaPool's split_min_rows: fewer rows per replica than this go in one call
# The cost table that ships with the package: made by `cost_table` from the GPU benchmark results
# (`python -m benchmarks.cost_table`), so an installed copy needs no repository at run time.
COSTS_FILE = Path(str(resources.files("moe_serve") / "costs.json"))


@dataclass(frozen=True)
class Costs:
    """What one layer costs on one GPU, measured on the `reference` shape and scaled from there."""
    reference: str = "mixtral-8x7b"
    # ms for the expert work of one layer (all experts, T tokens, top-2), measured at two or more T
    expert_ms: tuple[tuple[int, float], ...] = ((512, 1.6), (4096, 5.3))
    # hidden states through the wire, GB/s each way; one Python process moves its bytes one at a time
    wire_gbs: float = 0.15
    wire_fixed_ms: float = 0.0              # per layer at the router, whatever the bytes (per-call costs)
    wire_bytes_per_value: int = 2           # bf16 on the wire
    wire: str = "grpc figure"               # where the wire numbers come from
    gpu_memory_gb: float = 141.0            # H200
    hbm_gbs: float = 4800.0                 # H200 memory bandwidth: attention reads the KV cache at this rate
    source: str = "built-in H200 estimates (expert math 1.6 ms/layer at T=512, 5.3 ms at " \
                  "T=4096; naive gRPC of bf16 hidden states 0.13-0.18 GB/s)"

    def fit(self) -> tuple[float, float]:
        """(fixed ms per layer, ms per routed row) by least squares over the measured points."""
        T = np.array([t for t, _ in self.expert_ms], dtype=float)
        ms = np.array([m for _, m in self.expert_ms], dtype=float)
        k = preset(self.reference).top_k
        if len(T) < 2 or np.ptp(T) == 0:
            raise ValueError("costs need expert times at two or more different token counts")
        slope, intercept = np.polyfit(T * k, ms, 1)
        return max(float(intercept), 0.0), max(float(slope), 1e-9)


TRANSPORTS = {"grpc": 0.15, "pinned": 25.0}  # GB/s: naive Python gRPC, pinned host copy (H200)


def load_costs(path: str | Path | None = None, *, transport: str | None = None,
               wire_gbs: float | None = None) -> Costs:
    """Costs from a file (ours, or a `benchmarks/moe_layer.py` result), else the package's cost
    table (COSTS_FILE), else (or with path "defaults") the built-in estimates. The wire: the
    benchmark's rows of `transport` (default grpc) where it has them, else the figure of that name
    in TRANSPORTS; `wire_gbs` wins."""
    if path == "defaults":
        path = None
    elif path is None:
        path = COSTS_FILE if COSTS_FILE.is_file() else None
    costs = _costs_from_file(Path(path), transport) if path is not None else Costs()
    if transport is not None and costs.wire != f"{transport} measured":
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}"
                             + (f" or the transports measured in {path}" if path else ""))
        costs = _replace(costs, wire_gbs=TRANSPORTS[transport], wire_fixed_ms=0.0, wire=f"{transport} figure")
    if wire_gbs is not None:
        if not wire_gbs > 0:
            raise ValueError(f"wire bandwidth must be positive, got {wire_gbs}")
        costs = _replace(costs, wire_gbs=wire_gbs, wire_fixed_ms=0.0, wire="given")
    return costs


def cost_table(results_dir: Path, transport: str = "grpc") -> dict | None:
    """The cost table (a costs file's JSON) from the GPU benchmark results in `results_dir`, named
    after the run it came from, its device and date; None where there is no GPU run."""
    path = _gpu_benchmark(results_dir)
    if path is None:
        return None
    machine = json.loads(path.read_text()).get("machine", {})
    costs = _costs_from_file(path, transport)
    when = f", {machine.get('device', '?')}, {machine.get('date', '?')}" if machine else ""
    return asdict(costs) | {"source": costs.source.rstrip(")") + when + ")"}


def _gpu_benchmark(results_dir: Path) -> Path | None:
    """The GPU run of benchmarks/moe_layer.py on the largest shape (small matrices leave a GPU idle
    and would flatter the experts) that measured the most transports; a run that a later one
    measured again in full (naming it in `compare_to`) is superseded. A CPU run says nothing about
    a GPU deployment."""
    runs = {}
    for p in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(d, dict) and str(d.get("benchmark", "")).startswith("moe_layer")
                and str(d.get("device", "")).startswith("cuda") and d.get("preset") in _known_presets()):
            runs[p.stem] = (p, d, {r.get("transport") for r in d.get("rows", [])})
    superseded = {d.get("compare_to") for _, d, t in runs.values()
                  if d.get("compare_to") in runs and t >= runs[d["compare_to"]][2]}
    found = [(cfg.hidden_size * cfg.intermediate_size, len(t), p)
             for name, (p, d, t) in runs.items() if name not in superseded for cfg in [preset(d["preset"])]]
    return max(found)[2] if found else None


def _replace(costs: Costs, **kw) -> Costs:
    return Costs(**(asdict(costs) | kw))


def _costs_from_file(path: Path, transport: str | None = None) -> Costs:
    if not path.is_file():
        raise ValueError(f"costs file {path} not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"costs file {path} is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"costs file {path} must hold a JSON object")
    if str(d.get("benchmark", "")).startswith("moe_layer"):
        return _costs_from_benchmark(path, d, transport or "grpc")
    try:
        base = asdict(Costs())
        unknown = set(d) - set(base)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        d["expert_ms"] = tuple((int(t), float(ms)) for t, ms in d.get("expert_ms", base["expert_ms"]))
        costs = Costs(**(base | d | {"source": d.get("source", f"costs file {path}")}))
        preset(costs.reference)
        costs.fit()
    except (TypeError, ValueError) as e:
        raise ValueError(f"costs file {path}: {e}") from None
    return costs


def _costs_from_benchmark(path: Path, d: dict, transport: str) -> Costs:
    """A `benchmarks/moe_layer.py` result: its in-process rows give the layer's math; the extra time of
    the `transport` rows over in-process, against the bytes they moved, gives the wire as a line:
    fixed ms per layer + 2 * MB / (GB/s)."""
    by: dict[str, dict[int, dict]] = {}
    for r in d.get("rows") or []:
        by.setdefault(r.get("transport"), {})[r.get("T")] = r
    inproc = {T: r["ms"] for T, r in by.get("inprocess", {}).items()}
    if len(inproc) < 2 or d.get("preset") not in _known_presets():
        raise ValueError(f"{path}: need in-process rows at two token counts and a known preset")
    wire = {}
    points = [(r["MB_each_way"], r["ms"] - inproc[T]) for T, r in by.get(transport, {}).items() if T in inproc]
    if len(points) >= 2 and np.ptp([mb for mb, _ in points]) > 0:
        per_mb, fixed = np.polyfit(*np.array(points).T, 1)
        if per_mb > 0:
            wire = {"wire_gbs": 2 / float(per_mb), "wire_fixed_ms": max(float(fixed), 0.0)}
    if wire:
        wire["wire"] = f"{transport} measured"
    return Costs(reference=d["preset"], expert_ms=tuple(sorted(inproc.items())), **wire,
                 wire_bytes_per_value=2 if (d.get("wire_dtype") or d.get("dtype")) in ("bfloat16", "float16") else 4,
                 source=f"benchmark {path.name} ({d['preset']} on {d.get('device', '?')})")


def _known_presets():
    from moe_core.config import PRESETS
    return PRESETS


# -- synthetic traces --------------------------------------------------------------------------

def zipf_trace(cfg: MoEConfig, *, s: float, steps: int = 200, tokens: int = 512, seed: int = 0,
               shuffle_layers: bool = False) -> Trace:
    """Expert popularity ~ 1/rank**s. Without shuffle_layers expert e has the same rank in every layer
    (hot expert deployments: the hard case for per-expert scaling); with it each layer ranks afresh."""
    if s < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {s}")
    rng = np.random.default_rng(seed)
    L, E, k = cfg.n_layers, cfg.n_experts, cfg.top_k
    p = 1.0 / np.arange(1, E + 1) ** s
    p /= p.sum()
    probs = np.stack([rng.permutation(p) if shuffle_layers else p for _ in range(L)])  # [L, E]
    counts = np.stack([[rng.multinomial(tokens * k, probs[layer]) for layer in range(L)] for _ in range(steps)])
    return Trace(L, E, k, counts.astype(np.int64), np.full(steps, tokens, np.int64),
                 np.arange(1, steps + 1, dtype=np.float64),
                 {"source": f"synthetic zipf s={s}" + (" per-layer ranks" if shuffle_layers else ""), "seed": seed})


# -- the model --------------------------------------------------------------------------------

@dataclass
class Plan:
    gpus: int
    routers: int
    replicas: dict[str, int]
    tokens_per_s: float
    step_ms: float
    bottleneck: str
    expert_busy: dict[str, float] = field(default_factory=dict)  # fraction of time each expert's replicas work


class Simulator:
    def __init__(self, cfg: MoEConfig, trace: Trace, costs: Costs, *, batch_tokens: int = 512, context: int = 1024):
        if (trace.n_experts, trace.top_k) != (cfg.n_experts, cfg.top_k):
            raise ValueError(f"the trace routes top-{trace.top_k} of {trace.n_experts} experts, the model "
                             f"top-{cfg.top_k} of {cfg.n_experts}")
        # A trace of a model with other depth (the tiny test model, say) is tiled over the layers.
        self.trace_layers = trace.n_layers
        counts = trace.counts[:, np.arange(cfg.n_layers) % trace.n_layers]  # [S, L, E]
        if batch_tokens <= 0 or context < 0:
            raise ValueError(f"batch tokens must be positive and context >= 0, got {batch_tokens}, {context}")
        routed = counts.sum(axis=2)                                         # [S, L]
        keep = (routed > 0).all(axis=1)
        if not keep.any():
            raise ValueError("the trace has no step in which every layer routed tokens")
        self.cfg, self.costs, self.T, self.context = cfg, costs, batch_tokens, context
        self.names = [shard_name(e) for e in range(cfg.n_experts)]
        frac = counts[keep] / routed[keep][..., None]                       # [S, L, E]
        if len(frac) > MAX_STEPS:
            frac = frac[np.linspace(0, len(frac) - 1, MAX_STEPS).round().astype(int)]
        self.rows = batch_tokens * cfg.top_k * frac                         # rows per router step
        self.n_steps = len(frac)
        ref = preset(costs.reference)
        fixed_ms, row_ms = costs.fit()
        scale = (cfg.hidden_size * cfg.intermediate_size) / (ref.hidden_size * ref.intermediate_size)
        self.row_ms = row_ms * scale                                        # expert FLOPs per row scale with H*I
        self.call_ms = fixed_ms / ref.n_experts                             # launch overhead of one expert call
        self.wire_ms_per_row = 2 * cfg.hidden_size * costs.wire_bytes_per_value / (costs.wire_gbs * 1e6)  # out + back
        # attention, norms and gate run on the router; their FLOPs per token against one expert's
        d = cfg.dim_per_head
        dense = cfg.hidden_size * (cfg.n_heads + 2 * cfg.n_kv_heads) * d + cfg.n_heads * d * cfg.hidden_size \
            + cfg.hidden_size * cfg.n_experts
        self.dense_ms = batch_tokens * self.row_ms * dense / (3 * cfg.hidden_size * cfg.intermediate_size)
        # each token reads K and V of its context (bf16) from GPU memory
        self.dense_ms += batch_tokens * context * 2 * cfg.n_kv_heads * d * 2 / (costs.hbm_gbs * 1e6)
        self.router_wire_ms = batch_tokens * cfg.top_k * self.wire_ms_per_row
        self.base_ms = cfg.n_layers * (self.dense_ms + self.router_wire_ms + costs.wire_fixed_ms)
        self.weights_gb = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.n_layers * 2 / 1e9  # bf16
        if self.weights_gb > costs.gpu_memory_gb:
            raise ValueError(f"one expert's weights ({self.weights_gb:.0f} GB) exceed a GPU "
                             f"({costs.gpu_memory_gb:.0f} GB); split experts by layers (layers_per_shard)")

    def expert_side(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """With r replicas per expert: the router's path per step [S] and each replica's busy time per
        router step [S, E]. As the gRPC dispatcher does, an expert's rows of a layer are split over
        k = min(r, rows // SPLIT_MIN_ROWS) of its replicas (at least one), one call each, so extra
        replicas shorten a router's step as well as sharing the calls of many routers."""
        k = np.clip(np.minimum(r, self.rows // SPLIT_MIN_ROWS), 1, None)    # [S, L, E] calls
        slowest = (self.call_ms + self.row_ms * self.rows / k).max(axis=2).sum(axis=1)
        work = (k * self.call_ms + (self.row_ms + self.wire_ms_per_row) * self.rows).sum(axis=1)
        return self.base_ms + slowest, work / r

    def replica_order(self, extra: int) -> list[np.ndarray]:
        """Replica counts for 0..extra replicas beyond one per expert: each goes to the expert whose
        replicas are busiest on average."""
        r = np.ones(self.cfg.n_experts)
        out = [r.copy()]
        for _ in range(extra):
            _, busy = self.expert_side(r)
            r[int(busy.mean(axis=0).argmax())] += 1
            out.append(r.copy())
        return out

    def plans(self, max_gpus: int) -> list[Plan]:
        """The best plan for every GPU count from the minimum (a router and one replica per expert) up."""
        E = self.cfg.n_experts
        if not E + 1 <= max_gpus <= MAX_GPUS:
            raise ValueError(f"GPUs must lie in [{E + 1}, {MAX_GPUS}]: {E} experts and a router need {E + 1} "
                             f"(one replica per GPU); got {max_gpus}")
        orders = self.replica_order(max_gpus - E - 1)
        sides = [self.expert_side(r) for r in orders]
        path = np.stack([p for p, _ in sides])                              # [G, S] by extra replicas g
        busiest = np.stack([busy.max(axis=1) for _, busy in sides])         # [G, S]
        R = np.arange(1, max_gpus - E + 1, dtype=float)                     # router replicas
        # tokens/s with R routers and g extra replicas: [G, R]; GPUs used = E + g + R
        tps = np.stack([R * self.T * self.n_steps * 1e3 /
                        np.maximum(p, R[:, None] * b).sum(axis=1) for p, b in zip(path, busiest)])
        plans = []
        for n in range(E + 1, max_gpus + 1):
            g = np.arange(0, n - E)
            g = int(g[tps[g, n - E - 1 - g].argmax()])
            routers = n - E - g
            step = np.maximum(path[g], routers * busiest[g])
            busy = sides[g][1]
            plans.append(Plan(
                gpus=n, routers=routers, replicas={name: int(x) for name, x in zip(self.names, orders[g])},
                tokens_per_s=float(tps[g, routers - 1]), step_ms=float(step.mean()),
                bottleneck=self._bottleneck((routers * busiest[g] > path[g]).mean() > 0.5),
                expert_busy={name: float((routers * busy[:, e] / step).mean()) for e, name in enumerate(self.names)}))
        return plans

    def _bottleneck(self, expert_bound: bool) -> str:
        if expert_bound:
            return "expert replicas (add replicas to the busiest experts)"
        wire = self.router_wire_ms + self.costs.wire_fixed_ms
        return "router wire (hidden states to the experts and back)" if wire > self.dense_ms else "router dense math"

    def assumptions(self) -> dict:
        c, cfg = self.costs, self.cfg
        return {
            "costs_source": c.source,
            "reference_shape": c.reference,
            "expert_ms_per_layer_measured": [list(p) for p in c.expert_ms],
            "expert_ms_per_row": self.row_ms,
            "expert_call_overhead_ms": self.call_ms,
            "dense_ms_per_layer": self.dense_ms,
            "context_tokens_per_token": self.context,
            "hbm_gb_per_s": c.hbm_gbs,
            "wire_from": c.wire,
            "wire_gb_per_s_each_way": c.wire_gbs,
            "wire_bytes_per_value": c.wire_bytes_per_value,
            "wire_ms_per_layer_at_router": self.router_wire_ms + c.wire_fixed_ms,
            "wire_fixed_ms_per_layer": c.wire_fixed_ms,
            "batch_tokens_per_router_step": self.T,
            "trace_steps_used": self.n_steps,
            "trace_layers": self.trace_layers if self.trace_layers == cfg.n_layers
            else f"{self.trace_layers}, tiled over {cfg.n_layers}",
            "gpu_memory_gb": c.gpu_memory_gb,
            "expert_replica_weights_gb": self.weights_gb,
            "model": ("one GPU per router replica and per expert replica; a router runs its layers one after "
                      "another: dense math (with the KV reads), then its wire (every routed row out and back "
                      "through one process), then the slowest expert call; an expert's rows of a layer are "
                      f"split over its replicas, at least {SPLIT_MIN_ROWS} rows a call; its replicas share the "
                      "calls of all routers evenly and spend their own wire time; expert cost per row scales with hidden*intermediate from the "
                      "reference shape, dense cost with the parameter count; lm_head, sampling, queueing, "
                      "overlap of wire and compute and the network between hosts are left out"),
        }


def simulate(*, shape: str, gpus: int, trace: Trace | None = None, zipf: float | None = None,
             batch_tokens: int = 512, context: int = 1024, steps: int = 200, seed: int = 0,
             shuffle_layers: bool = False,
             costs: Costs | None = None, target_tokens_per_s: float | None = None) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cfg = preset(shape)
    if (trace is None) == (zipf is None):
        raise ValueError("give exactly one of a trace and a zipf exponent")
    if trace is None:
        trace = zipf_trace(cfg, s=zipf, steps=steps, tokens=batch_tokens, seed=seed, shuffle_layers=shuffle_layers)
    sim = Simulator(cfg, trace, costs or load_costs(), batch_tokens=batch_tokens, context=context)
    plans = sim.plans(gpus)
    best = plans[-1]
    source = trace.meta.get("source", "?")
    if source == "record":
        source = f"recorded from {trace.meta.get('address', '?')}, {trace.n_steps} polls"
    out = {"shape": shape, "trace": source, **asdict(best),
           "curve": [{"gpus": p.gpus, "tokens_per_s": p.tokens_per_s} for p in plans]}
    out["load_share"] = dict(zip(sim.names, (trace.counts.sum(axis=(0, 1)) / max(trace.counts.sum(), 1)).tolist()))
    if target_tokens_per_s is not None:
        hit = next((p for p in plans if p.tokens_per_s >= target_tokens_per_s), None)
        out["target_tokens_per_s"] = target_tokens_per_s
        out["gpus_needed"] = hit.gpus if hit else None
    out["assumptions"] = sim.assumptions()
    return out


def render(out: dict) -> str:
    reps = "  ".join(f"{n}: {r}" for n, r in out["replicas"].items())
    share = "  ".join(f"{n}: {s:.0%}" for n, s in out["load_share"].items())
    lines = [
        f"{out['shape']} on {out['gpus']} GPUs, trace: {out['trace']}",
        f"  costs             {out['assumptions']['costs_source']}",
        f"  router replicas   {out['routers']}",
        f"  expert replicas   {reps}",
        f"  load share        {share}",
        f"  GPUs used         {out['routers'] + sum(out['replicas'].values())}",
        f"  tokens/s          {out['tokens_per_s']:,.0f}",
        f"  step              {out['step_ms']:,.1f} ms for {out['assumptions']['batch_tokens_per_router_step']} "
        f"tokens per router",
        f"  bottleneck        {out['bottleneck']}",
    ]
    if "target_tokens_per_s" in out:
        need = out["gpus_needed"]
        lines.append(f"  GPUs needed       {need if need else 'more than ' + str(out['gpus'])} "
                     f"for {out['target_tokens_per_s']:,.0f} tokens/s")
    curve = out["curve"]
    picks = {curve[int(i * (len(curve) - 1) / 4)]["gpus"] for i in range(5)}  # five points, both ends
    lines.append("  tokens/s by GPUs  " + "  ".join(f"{c['gpus']}: {c['tokens_per_s']:,.0f}"
                                                   for c in curve if c["gpus"] in picks))
    lines.append("assumptions:")
    for k, v in out["assumptions"].items():
        lines.append(f"  {k}: {_fmt(v)}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
