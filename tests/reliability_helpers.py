"""Shared by the reliability tests (fuzz, faults, security): a small checkpoint whose clusters come up
quickly, a Serve-config edit for its expert deployments, and call helpers that never raise."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import threading
import time
from pathlib import Path

import grpc
import ray

from expert_service.directory import DEFAULT_NAME, NAMESPACE
from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from moe_core.tokenizer import write_tokenizer
from router_service.channels.grpc_bytes import BytesChannel

NOT_ALLOWED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def small_model(directory: Path, n_experts: int = 2) -> Path:
    """The tiny preset with fewer experts: fewer replicas to start. With top-2 of 2 experts every
    token visits every expert shard, so losing any shard touches every request."""
    cfg = preset("tiny").replace(n_experts=n_experts)
    write_checkpoint(directory, cfg, random_weights(cfg, seed=0))
    write_tokenizer(directory, cfg.vocab_size)
    return directory


def experts(n_experts: int, replicas: int | None = None):
    """A running_app `edit`: keep the expert deployments the model has; fixed replica counts."""
    def edit(cfg):
        app = cfg["applications"][0]
        app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("expert-")
                              or int(d["name"].split("-")[1]) < n_experts]
        if replicas is not None:
            for d in app["deployments"]:
                if d["name"].startswith("expert-"):
                    d.pop("autoscaling_config", None)
                    d["num_replicas"] = replicas
        return cfg
    return edit


def call(fn, *args, **kw):
    """(status code, seconds, reply or details): a gRPC call that reports instead of raising."""
    t = time.monotonic()
    try:
        reply = fn(*args, **kw)
        return grpc.StatusCode.OK, time.monotonic() - t, reply
    except grpc.RpcError as e:
        return e.code(), time.monotonic() - t, e.details() or ""


def directory_table() -> dict[str, list[str]]:
    return ray.get(ray.get_actor(DEFAULT_NAME, namespace=NAMESPACE).table.remote(), timeout=30)


def expert_counters(**client_kw) -> dict[str, tuple[int, int]]:
    """address -> (calls, in_flight) as every registered expert replica reports it over Info."""
    addresses = [a for rs in directory_table().values() for a in rs]

    async def ask():
        out = {}
        for a in addresses:
            async with BytesChannel(a, **client_kw) as c:
                info = await c.info(timeout=10)
                out[a] = (info.calls, info.in_flight)
        return out
    return asyncio.run(ask())


def replica_actors(deployment: str, app: str = "moe") -> list[str]:
    """Names of the live Serve replica actors of one deployment (SERVE_REPLICA::app#name#id)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(every_s)


def replicas_killed_under_load(stub, work, deployments: list[str], *, seed: int, every_s: float = 5.0,
                               clients: int = 8, min_requests: int = 200, min_kills: int = 3, timeout_s: float = 210):
    """`clients` callers send greedy Completes of `work` [(prompt, max_new_tokens)] one after another
    while a random replica of `deployments` is killed every `every_s`, until `min_requests` are done
    and `min_kills` replicas were killed. Returns ({job index: (code, seconds, reply)}, kills, seconds)."""
    from moe_serve import client
    from router_service.sampling import SamplingParams

    stop, kills, lock = threading.Event(), [], threading.Lock()
    results, next_job = {}, iter(range(len(work)))

    def killer():
        rng = random.Random(seed)
        while not stop.wait(every_s):
            alive = [a for d in deployments for a in replica_actors(d)]
            if alive:
                victim = rng.choice(alive)
                kill_replica(victim)
                kills.append(victim)

    def client_loop():
        while True:
            with lock:
                i = next(next_job, None)
                if i is None or (len(results) >= min_requests and len(kills) >= min_kills):
                    return
            prompt, n = work[i]
            results[i] = call(stub.Complete, client.request(prompt, None, SamplingParams(max_new_tokens=n)),
                              timeout=timeout_s)

    k = threading.Thread(target=killer, daemon=True)
    started = time.monotonic()
    k.start()
    try:
        with cf.ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(client_loop) for _ in range(clients)]:
                f.result()
    finally:
        stop.set()
        k.join(timeout=30)
    return results, kills, time.monotonic() - started
