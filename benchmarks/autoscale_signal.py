"""Which load report tells a hot expert from cold ones? (the choice behind expert_service.autoscaling)

Deploys the app on a local Ray cluster with one replica per expert and no autoscaling, sends
uniform load, then load skewed towards one expert (`moe-serve load`'s traffic), and samples every
expert replica's `record_autoscaling_stats` (rows_per_s, busy, calls/rows in flight) all along.
For each report: the mean per expert in each phase, and the hot expert's mean over the busiest
cold expert's under skew.

    python -m benchmarks.autoscale_signal [--model models/tiny] [--rps 8] [--seconds 20] [--skew 0.8]
"""
from __future__ import annotations

import argparse
import asyncio
import socket

import numpy as np
import ray
from ray import serve

from benchmarks.common import save
from expert_service.autoscaling import METRICS
from expert_service.directory import NAMESPACE, kill_directory
from moe_core.config import MoEConfig
from moe_serve.launcher import deploy, load_config
from moe_serve.loadgen import hot_tokens, run_load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_experts(cfg: dict) -> dict:
    for d in cfg["applications"][0]["deployments"]:
        if d["name"].startswith("expert-"):
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1  # Serve then never calls record_autoscaling_stats; only we do
    return cfg


async def _phase(address, handles, *, rps, seconds, skew, hot, vocab, period_s=0.6) -> dict:
    samples = {name: [] for name in handles}
    load = asyncio.create_task(run_load(address, rps=rps, duration_s=seconds, skew=skew, hot=hot,
                                        vocab_size=vocab, concurrency=16))
    await asyncio.sleep(3)  # past the start-up transient
    for h in handles.values():  # start each replica's interval now
        await h.record_autoscaling_stats.remote()
    while not load.done():
        await asyncio.sleep(period_s)
        for name, h in handles.items():
            samples[name].append(await h.record_autoscaling_stats.remote())
    report = await load
    means = {name: {m: float(np.mean([s[m] for s in ss])) for m in METRICS} for name, ss in samples.items() if ss}
    return {"load": report, "means": means}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny")
    p.add_argument("--rps", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--skew", type=float, default=0.8)
    p.add_argument("--hot-expert", type=int, default=3)
    a = p.parse_args(argv)

    ray.init(num_cpus=16, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _fixed_experts(load_config(model=a.model, port=_free_port()))
        address = deploy(cfg, wait_s=600)
        vocab = MoEConfig.from_dir(cfg["applications"][0]["args"]["model"]).vocab_size
        hot = hot_tokens(a.model, a.hot_expert)
        names = [d["name"] for d in cfg["applications"][0]["deployments"] if d["name"].startswith("expert-")]
        handles = {n: serve.get_deployment_handle(n, "moe") for n in names}

        async def both():
            return {phase: await _phase(address, handles, rps=a.rps, seconds=a.seconds, skew=skew, hot=hot, vocab=vocab)
                    for phase, skew in (("uniform", 0.0), ("skewed", a.skew))}
        phases = asyncio.run(both())
    finally:
        serve.shutdown()
        kill_directory()
        ray.shutdown()

    hot_name = f"expert-{a.hot_expert}"
    rows = []
    for m in METRICS:
        uni = [v[m] for v in phases["uniform"]["means"].values()]
        sk = phases["skewed"]["means"]
        cold = [v[m] for n, v in sk.items() if n != hot_name]
        rows.append({"report": m, "uniform_min": min(uni), "uniform_max": max(uni), "skewed_hot": sk[hot_name][m],
                     "skewed_cold_min": min(cold), "skewed_cold_max": max(cold),
                     "hot_over_busiest_cold": sk[hot_name][m] / max(cold) if max(cold) > 0 else None})
    save("autoscale_signal", rows, {"model": a.model, "rps": a.rps, "seconds": a.seconds, "skew": a.skew,
                                    "hot_expert": a.hot_expert, "phases": phases},
         ["report", "uniform_min", "uniform_max", "skewed_hot", "skewed_cold_min", "skewed_cold_max",
          "hot_over_busiest_cold"])


if __name__ == "__main__":
    main()
