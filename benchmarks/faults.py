"""Question: what do requests see while expert replicas die?

A real Ray cluster on this machine with a two-expert tiny model (top-2 of 2: every token visits
both expert deployments), the app deployed with small engine limits (4 running, 4 queued). 8
callers send greedy `Complete`s one after another while a random expert replica is killed
(`ray.kill`) every 5 s, until at least --requests are done and 3 replicas were killed; with
--replicas per expert (the router retries on another replica, or waits for Serve to restart the
only one, up to `expert_wait_s`). Rows: requests, kills, failed, retries and waits the router
counted, latency p50/p99 of all requests; `right` = share of answers equal to the in-process
engine's.

    python -m benchmarks.faults [--replicas 2,1] [--requests 200]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc
import numpy as np
from ray import serve

from benchmarks.common import save
from moe.v1 import gateway_pb2_grpc
from moe_serve import client
from router_service.engine import local_engine
from moe_serve.launcher import deploy
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import running_app
from tests.reliability_helpers import (directory_table, experts, replica_actors, replicas_killed_under_load,
                                       small_model, wait_until)

APP_ARGS = dict(max_running=4, max_queued=4, shared_memory="", expert_wait_s=150)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="2,1", help="replicas per expert, one run each")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--name", default="faults")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    work = [(rng.integers(3, 512, size=int(rng.integers(2, 10))).tolist(), int(rng.integers(2, 6)))
            for _ in range(20 * a.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = small_model(Path(d))
        engine = local_engine(model)
        with running_app(model, edit=experts(2, replicas=2), **APP_ARGS) as (address, cfg):
            stub = gateway_pb2_grpc.GatewayStub(client.channel(address, ca="", token=""))
            router = serve.get_deployment_handle("Router", app_name="moe")
            for n in (int(r) for r in a.replicas.split(",")):
                for dep in cfg["applications"][0]["deployments"]:
                    if dep["name"].startswith("expert-"):
                        dep["num_replicas"] = n
                deploy(cfg, wait_s=300)
                wait_until(lambda: all(len(replica_actors(f"expert-{e}")) == n for e in range(2))
                           and all(len(v) == n for v in directory_table().values()), 180, f"{n} replicas per expert")
                before = router.stats.remote().result(timeout_s=60)
                results, kills, seconds = replicas_killed_under_load(
                    stub, work, ["expert-0", "expert-1"], seed=n, min_requests=a.requests,
                    timeout_s=APP_ARGS["expert_wait_s"] + 60)
                after = router.stats.remote().result(timeout_s=60)
                done = sorted(results)
                ok = [i for i in done if results[i][0] == grpc.StatusCode.OK]
                right = [list(results[i][2].token_ids) == asyncio.run(engine.complete(
                    work[i][0], SamplingParams(max_new_tokens=work[i][1])))[0] for i in ok]
                p50, p99 = np.percentile([results[i][1] for i in done], [50, 99])
                rows.append({"replicas_per_expert": n, "requests": len(done), "seconds": seconds, "kills": len(kills),
                             "failed": len(done) - len(ok), "right": sum(right) / max(1, len(done)),
                             "retries": after["expert_retries"] - before["expert_retries"],
                             "waits": after["expert_waits"] - before["expert_waits"],
                             "p50_s": float(p50), "p99_s": float(p99)})
                print(rows[-1], flush=True)
    save(a.name, rows, {"kill_every_s": 5.0, "clients": 8, **APP_ARGS},
         ["replicas_per_expert", "requests", "seconds", "kills", "failed", "right", "retries", "waits", "p50_s", "p99_s"])


if __name__ == "__main__":
    main()
