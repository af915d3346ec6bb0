"""Per-expert autoscaling: the load replicas report, the policy, the replica planner, the router's
metrics; then on a real cluster, a hot expert scales up under skewed load and back down while
traffic goes on, with no failed request."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import yaml
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from expert_service.autoscaling import ExpertLoadPolicy, LoadMeter, desired_replicas
from expert_service.experts import ExpertShard
from moe_core.shards import shards_from_names
from moe_serve.planner import assign_replicas, imbalance, plan
from expert_service.server import ExpertServicer, start_server
from moe_core.checkpoint import Checkpoint
from router_service import model
from router_service.dispatch import remote_dispatcher
from router_service.engine import Engine, local_engine
from moe_serve.launcher import DEFAULT_CONFIG, load_config
from router_service.metrics import RouterMetrics, layer_imbalance
from router_service.sampling import SamplingParams
from tests.conftest import run

# -- the policy ---------------------------------------------------------------------------------


def test_desired_replicas_rounds_up_and_scales_down_with_a_margin():
    assert desired_replicas(0, 100, current=1) == 1
    assert desired_replicas(250, 100, current=1) == 3
    assert desired_replicas(100, 100, current=1) == 1
    # At 2 replicas, 90 rows/s fits one replica, but not with 20% to spare: stay at 2.
    assert desired_replicas(90, 100, current=2) == 2
    assert desired_replicas(79, 100, current=2) == 1
    assert desired_replicas(170, 100, current=3) == 3   # 170 / (0.8 * 100) = 2.1 -> 3
    assert desired_replicas(150, 100, current=3) == 2


def context(per_replica: dict | None, target_replicas: int, name="expert-3"):
    from ray.serve._private.common import DeploymentID
    return AutoscalingContext(
        deployment_id=DeploymentID(name, "moe"), deployment_name=name, app_name="moe",
        current_num_replicas=target_replicas, target_num_replicas=target_replicas,
        running_replicas=list(per_replica or []), total_num_requests=0, total_queued_requests=0,
        aggregated_metrics={"rows_per_s": per_replica} if per_replica is not None else {},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=None)


def test_policy_sums_replica_reports(tmp_path):
    policy = ExpertLoadPolicy(target=200)
    assert policy(context({"r1": 450.0}, 1))[0] == 3
    assert policy(context({"r1": 120.0, "r2": 110.0}, 2))[0] == 2   # 230 needs 2
    assert policy(context({"r1": 40.0, "r2": 30.0, "r3": 0.0}, 3))[0] == 1
    assert policy(context(None, 2))[0] == 2   # no report yet: keep Serve's target

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"replicas": {"expert-3": 2, "expert-0": 1}}))
    floored = ExpertLoadPolicy(target=200, plan=str(plan_file))
    assert floored(context({"r1": 10.0}, 1))[0] == 2               # the plan is a floor
    assert floored(context({"r1": 900.0}, 2))[0] == 5               # load still goes above it
    assert floored(context({"r1": 10.0}, 1, name="expert-0"))[0] == 1
    plan_file.write_text("{half written")
    assert floored(context({"r1": 10.0}, 1))[0] == 1               # a broken plan is ignored

    for bad in ({"metric": "qps"}, {"target": 0}, {"downscale_margin": 1.5}):
        with pytest.raises(ValueError):
            ExpertLoadPolicy(**bad)


def test_serve_yaml_gives_every_expert_its_own_policy(tiny_model):
    cfg = load_config(DEFAULT_CONFIG, model=str(tiny_model))  # experts from the checkpoint
    experts = [d for d in cfg["applications"][0]["deployments"] if d["name"].startswith("expert-")]
    assert len(experts) == 8
    for d in experts:
        ac = AutoscalingConfig(**d["autoscaling_config"])
        assert ac.min_replicas <= ac.max_replicas and ac.max_replicas >= 2
        # What Serve's controller does with it: unpickle the class and build it with policy_kwargs.
        policy = ac.policy.get_policy()(**ac.policy.policy_kwargs)
        assert isinstance(policy, ExpertLoadPolicy) and policy.metric == "rows_per_s"


# -- what replicas report, what the router counts ----------------------------------------------


def two_shards(tiny_model):
    """Experts 0-3 and 4-7 of every layer, each set behind its own ExpertServicer."""
    ckpt = Checkpoint(tiny_model)
    cfg = ckpt.config
    shards = {"low": [(L, e) for L in range(cfg.n_layers) for e in range(4)],
              "high": [(L, e) for L in range(cfg.n_layers) for e in range(4, 8)]}
    servicers = {n: ExpertServicer(ExpertShard.load(ckpt, pairs)) for n, pairs in shards.items()}
    return ckpt, shards, servicers


async def _serve_and_run(ckpt, shards, servicers, prompts):
    """The router's engine and remote dispatcher against real ExpertService servers on loopback."""
    servers, table = [], {}
    for name, s in servicers.items():
        server, port = await start_server(s)
        servers.append(server)
        table[name] = [f"127.0.0.1:{port}"]

    async def lookup():
        return table
    shard_of = {pair: name for name, pairs in shards.items() for pair in pairs}
    dispatcher = remote_dispatcher(shard_of, lookup)
    engine = Engine(ckpt.config, model.DenseWeights.load(ckpt), dispatcher)
    metrics = RouterMetrics(engine)
    meters = {n: LoadMeter(s) for n, s in servicers.items()}
    started = time.monotonic()
    try:
        await asyncio.gather(*(engine.complete(p, SamplingParams(max_new_tokens=4)) for p in prompts))
        reports = {n: m.sample() for n, m in meters.items()}
        elapsed = time.monotonic() - started
        collected = metrics.flush()
        again = metrics.collect()
    finally:
        await dispatcher.close()
        for server in servers:
            await server.stop(None)
    return engine, dispatcher, reports, elapsed, collected, again


def test_reports_and_metrics_match_what_was_routed(tiny_model):
    ckpt, shards, servicers = two_shards(tiny_model)
    prompts = [[3] * 20, list(range(40, 70)), [9, 8, 7], [100] * 5]
    engine, dispatcher, reports, elapsed, got, again = run(_serve_and_run(ckpt, shards, servicers, prompts))
    counts = engine.stats.counts
    H = ckpt.config.hidden_size

    # Every row the gate routed reached the shard that serves it, and the replica's report says so.
    for name, pairs in shards.items():
        routed = sum(counts[L, e] for L, e in pairs)
        assert servicers[name].rows == routed > 0
        assert reports[name]["rows_per_s"] * elapsed == pytest.approx(routed, rel=0.05)
        assert 0 < reports[name]["busy"] < 1.5
        assert reports[name]["calls_in_flight"] == 0 and reports[name]["rows_in_flight"] == 0

    # The metrics flush carries exactly the routed counts, the bytes on the wire and one latency per call.
    assert (got["routed"] == counts).all()
    assert got["bytes"] == {"scattered": int(counts.sum()) * H * 4, "gathered": int(counts.sum()) * H * 4}
    assert sum(got["calls"].values()) == dispatcher.pool.calls and set(got["calls"]) == set(shards)
    sample = got["latency_sample"]
    assert len(sample) == min(dispatcher.pool.calls, 128) and all(0 < seconds < 30 for _, seconds in sample)
    assert got["imbalance"] == pytest.approx(layer_imbalance(counts))
    assert got["queue"] == {"queued": 0, "running": 0}
    # Nothing new since: the next flush records nothing.
    assert not again["routed"].any() and again["bytes"] == {"scattered": 0, "gathered": 0}
    assert again["calls"] == {} and again["latency_sample"] == []


def test_layer_imbalance():
    c = np.array([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0]])
    assert layer_imbalance(c) == [1.0, 4.0, None]


def test_metrics_collect_on_the_local_engine(tiny_model):
    engine = local_engine(tiny_model)
    metrics = RouterMetrics(engine, window_s=10.0)
    run(engine.complete([5, 6, 7], SamplingParams(max_new_tokens=3)))
    first = metrics.collect(now=100.0)
    k_layers = engine.cfg.top_k * engine.cfg.n_layers
    assert first["routed"].sum() == engine.stats.counts.sum() == engine.stats.tokens * k_layers > 0
    assert first["calls"] == {} and first["bytes"] == {"scattered": 0, "gathered": 0}  # in-process: no wire
    run(engine.complete([1] * 4, SamplingParams(max_new_tokens=1)))
    second = metrics.collect(now=105.0)
    assert second["routed"].sum() == 4 * k_layers  # one prefill step of 4 tokens
    assert second["imbalance"] == pytest.approx(layer_imbalance(engine.stats.counts))  # both in the window
    assert metrics.collect(now=200.0)["imbalance"] == []  # the window has passed: nothing recent


# -- the planner --------------------------------------------------------------------------------


def test_greedy_assignment_minimises_the_largest_load_per_replica():
    rng = np.random.default_rng(0)
    for _ in range(40):
        loads = {f"s{i}": float(v) for i, v in enumerate(rng.integers(0, 100, size=4))}
        budget = int(rng.integers(4, 10))
        got = assign_replicas(loads, budget)
        assert all(n >= 1 for n in got.values()) and sum(got.values()) <= budget
        best = min(max(loads[s] / r for s, r in zip(loads, rs))
                   for rs in itertools.product(range(1, budget - 2), repeat=4) if sum(rs) <= budget)
        assert max(loads[s] / got[s] for s in loads) == pytest.approx(best)


def test_plan_predicts_imbalance_before_and_after():
    counts = [[100, 10, 10, 10, 10, 10, 10, 10], [80, 20, 10, 10, 10, 10, 10, 10]]
    p = plan(counts, 12)
    assert p["replicas"]["expert-0"] == 5 and sum(p["replicas"].values()) == 12
    assert p["imbalance_before"] == pytest.approx([100 / (170 / 8), 80 / (160 / 8)])
    assert p["imbalance_after"] == pytest.approx([20 / (170 / 12), 20 / (160 / 12)])
    assert p["overall_after"] < p["overall_before"]
    # Balanced load: nothing to fix, extra replicas spread evenly.
    even = plan([[5] * 8] * 2, 16)
    assert even["imbalance_before"] == [1.0, 1.0] == even["imbalance_after"]
    assert set(even["replicas"].values()) == {2}
    # Caps, and a budget that cannot cover every shard.
    assert plan(counts, 12, max_replicas=2)["replicas"]["expert-0"] == 2
    with pytest.raises(ValueError, match="cannot give 8 shards"):
        plan(counts, 7)
    with pytest.raises(ValueError, match="layers"):
        plan([[1, 2], [3]], 4)


def test_shards_from_deployment_names():
    shards = shards_from_names(["expert-2", "expert-5-layers-0-1", "expert-5-layers-2-3"], 4)
    assert shards["expert-2"] == [(0, 2), (1, 2), (2, 2), (3, 2)]
    assert shards["expert-5-layers-2-3"] == [(2, 5), (3, 5)]
    counts = [[0] * 6 for _ in range(4)]
    counts[3][5] = 30
    counts[0][2] = 10
    # layer 0: 10 vs 0 rows on one replica each; layer 3: 0 rows on 1 replica, 30 on 3.
    assert imbalance(counts, shards, {"expert-2": 1, "expert-5-layers-0-1": 1, "expert-5-layers-2-3": 3}) \
        == pytest.approx([10 / (10 / 2), 1.0, 1.0, 10 / (30 / 4)])
    with pytest.raises(ValueError, match="Router"):
        shards_from_names(["Router"], 2)


# -- on a real cluster --------------------------------------------------------------------------

HOT = 3
TARGET = 200  # rows/s per replica: the hot expert gets ~500 under the skewed load here, the others ~100


def fast_autoscaling(cfg):
    """Short windows and delays so that scaling shows within seconds (serve.yaml uses longer ones)."""
    for d in cfg["applications"][0]["deployments"]:
        if d["name"].startswith("expert-"):
            d["autoscaling_config"] = {
                "min_replicas": 1, "max_replicas": 3, "look_back_period_s": 3, "metrics_interval_s": 1,
                "upscale_delay_s": 1, "downscale_delay_s": 4,
                "policy": {"policy_function": "expert_service.autoscaling:ExpertLoadPolicy",
                           "policy_kwargs": {"target": TARGET}}}
    return cfg


@pytest.fixture(scope="module")
def scaling_app(tiny_model):
    from tests.cluster_fixtures import running_app
    # Ray's metrics agent exports every second instead of every ten (read when Ray starts).
    old = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    try:
        with running_app(tiny_model, edit=fast_autoscaling) as (address, cfg):
            import ray
            yield address, ray._private.worker.global_worker.node.metrics_export_port
    finally:
        if old is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = old


def replicas(address) -> dict[str, int]:
    from moe_serve.client import stats
    return {d.name: d.replicas for d in stats(address).deployments}


class Load:
    """run_load in a thread until stopped (or its duration ends); keeps the report."""

    def __init__(self, address, **kw):
        from moe_serve.loadgen import run_load
        self.report, self.loop, self.stop = None, asyncio.new_event_loop(), None

        async def main():
            self.stop = asyncio.Event()
            self.report = await run_load(address, stop=self.stop, **kw)
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()

    def finish(self) -> dict:
        while self.stop is None:
            time.sleep(0.01)
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=120)
        self.loop.close()
        return self.report


def wait_for(predicate, timeout_s, what):
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        ok, seen = predicate()
        if ok:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s}s; last seen {seen}")


def scrape(port: int, name: str) -> dict[tuple, float]:
    """Prometheus text from Ray's metrics agent -> {sorted label items: value} for one metric."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M):
        labels = tuple(sorted((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(1))
                              if k in ("layer", "expert", "shard", "direction", "state")))
        out[labels] = out.get(labels, 0.0) + float(m.group(2))
    return out


@pytest.mark.cluster
def test_hot_expert_scales_up_and_back_down_without_failures(scaling_app, tiny_model, tmp_path):
    from moe_serve.client import stats
    from moe_serve.loadgen import hot_tokens
    address, metrics_port = scaling_app
    # one replica each, once every one has registered (a replica may still be starting right after deploy)
    wait_for(lambda: (set((r := replicas(address)).values()) == {1}, r), 120, "one registered replica per expert")
    hot = hot_tokens(tiny_model, HOT)
    hot_name = f"expert-{HOT}"
    peak: dict[str, int] = {}

    def scaled():
        r = replicas(address)
        for k, v in r.items():
            peak[k] = max(peak.get(k, 0), v)
        return r[hot_name] >= 2, r

    # Skewed load: every prompt routes to the hot expert at every layer.
    started = time.monotonic()
    load = Load(address, rps=8, duration_s=240, concurrency=16, skew=1.0, hot=hot, prompt_len=32,
                max_new_tokens=4, vocab_size=512)
    try:
        wait_for(scaled, 180, f"{hot_name} reaches 2 replicas")
        scale_up_s = time.monotonic() - started
        time.sleep(3)  # calls keep flowing while the new replica joins
        scaled()
    finally:
        skewed = load.finish()
    at_min = [k for k, v in peak.items() if k != hot_name and v == 1]
    assert len(at_min) >= 4, f"peak replicas {peak}"
    s = stats(address)
    per_expert = np.array([list(layer.tokens_per_expert) for layer in s.layers]).sum(axis=0)
    assert per_expert[HOT] > 2 * np.delete(per_expert, HOT).max()

    # Light uniform load goes on while the hot expert drains back to its minimum.
    load = Load(address, rps=3, duration_s=150, concurrency=8, prompt_len=32, max_new_tokens=4, vocab_size=512)
    try:
        wait_for(lambda: (replicas(address)[hot_name] == 1, replicas(address)), 90, f"{hot_name} back to 1 replica")
        time.sleep(6)  # past the drained replica's stop: its in-flight calls finish, new ones go elsewhere
    finally:
        uniform = load.finish()
    print(json.dumps({"scale_up_s": round(scale_up_s, 1), "peak": peak, "skewed": skewed, "uniform": uniform}))
    for report in (skewed, uniform):
        assert report["failed"] == 0 and report["ok"] == report["requests"] > 0, report
    assert set(replicas(address).values()) == {1}

    # The Prometheus counters carry the same routed counts as the Stats RPC (once exported).
    def same_counts():
        want = {(("expert", str(e)), ("layer", str(L))): float(n)
                for L, layer in enumerate(stats(address).layers) for e, n in enumerate(layer.tokens_per_expert) if n}
        got = scrape(metrics_port, "ray_moe_tokens_routed_total")
        return got == want, {"prometheus": sum(got.values()), "stats": sum(want.values())}
    wait_for(same_counts, 30, "Prometheus routed counts equal the Stats counts")
    calls = scrape(metrics_port, "ray_moe_expert_calls_total")
    latency = scrape(metrics_port, "ray_moe_expert_call_latency_s_count")
    assert {dict(k)["shard"] for k in latency} == {dict(k)["shard"] for k in calls} == {f"expert-{e}" for e in range(8)}
    assert all(0 < latency[k] <= calls[k] for k in calls)  # the histogram holds a sample of the calls
    print(json.dumps({"expert_calls": sum(calls.values()), "tokens": stats(address).tokens_processed}))
    nbytes = scrape(metrics_port, "ray_moe_expert_bytes_total")
    assert nbytes[(("direction", "scattered"),)] == nbytes[(("direction", "gathered"),)] > 0
    assert scrape(metrics_port, "ray_moe_layer_load_imbalance")
    assert scrape(metrics_port, "ray_moe_router_queue_depth")


@pytest.mark.cluster
def test_stats_plot_plan_and_load_commands(scaling_app, tiny_model, tmp_path, capsys):
    from moe_serve.cli import main
    address, _ = scaling_app
    assert main(["load", "--address", address, "--rps", "4", "--duration", "3", "--skew", "0.5",
                 "--hot-expert", str(HOT), "--model", str(tiny_model), "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == 0 and report["ok"] == report["requests"] >= 8
    assert 0 < report["hot_requests"] < report["requests"]
    assert report["latency_s"]["p50"] <= report["latency_s"]["p99"] and report["tokens_per_s"] > 0

    png = tmp_path / "heat.png"
    assert main(["stats", "--address", address, "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["plan", "--address", address, "--budget", "10", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert sum(p["replicas"].values()) == 10
    assert max(p["replicas"], key=p["replicas"].get) == f"expert-{HOT}"  # the most loaded gets the most
    assert p["overall_after"] <= p["overall_before"]
