"""The expert directory: a named Ray actor where expert replicas register their gRPC address.

Replicas register on start, heartbeat while alive and deregister before they stop; the router
reads the table. A replica that dies without deregistering (ray.kill, a lost node) drops out
when its heartbeats stop, or at once when a router reports its address dead.
"""
from __future__ import annotations

import time

import ray

NAMESPACE = "moe-serve"
DEFAULT_NAME = "moe-expert-directory"
HEARTBEAT_S = 1.0
TTL_S = 5.0


@ray.remote(num_cpus=0, max_restarts=-1)
class ExpertDirectory:
    def __init__(self):
        self.entries: dict[str, dict[str, tuple[str, float]]] = {}  # shard -> replica -> (address, seen)
        self.draining: set[str] = set()

    def register(self, shard: str, replica: str, address: str) -> None:
        if replica not in self.draining:
            self.entries.setdefault(shard, {})[replica] = (address, time.monotonic())

    def deregister(self, shard: str, replica: str) -> None:
        self.draining.add(replica)  # a late heartbeat must not bring it back
        self.entries.get(shard, {}).pop(replica, None)

    def forget(self, address: str) -> None:
        for replicas in self.entries.values():
            for rid in [r for r, (a, _) in replicas.items() if a == address]:
                del replicas[rid]

    def table(self) -> dict[str, list[str]]:
        now = time.monotonic()
        for replicas in self.entries.values():
            for rid in [r for r, (_, seen) in replicas.items() if now - seen > TTL_S]:
                del replicas[rid]
        return {shard: sorted(a for a, _ in replicas.values()) for shard, replicas in self.entries.items()}


def get_directory(name: str = DEFAULT_NAME):
    """The directory actor, created on first use; detached, so it outlives any one replica."""
    return ExpertDirectory.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                   lifetime="detached").remote()


def kill_directory(name: str = DEFAULT_NAME) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
