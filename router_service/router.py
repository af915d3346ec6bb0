"""The router deployment: one engine (continuous batching, KV caches, gates) whose expert calls
go over gRPC to the expert replicas registered in the directory."""
from __future__ import annotations

import logging
import os
import time

import ray
import torch
from ray import serve

from expert_service.directory import DEFAULT_NAME, get_directory
from moe_core.checkpoint import Checkpoint
from moe_core.codec import DTYPES
from router_service import model, security
from router_service.channels.by_name import LOOPBACK
from router_service.dispatch import remote_dispatcher
from router_service.engine import Engine
from router_service.metrics import RouterMetrics
from router_service.sampling import SamplingParams
from router_service.serving import RouterConfig

log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=2)
class Router:
    def __init__(self, model_dir: str, shards: dict[str, list], cfg: RouterConfig = RouterConfig(),
                 directory: str = DEFAULT_NAME, *, experts: list | None = None, expert_tls: dict | None = None,
                 deploy_id: str = ""):
        # "auto" follows the expert replicas' rule: a GPU when the deployment's num_gpus gave it one.
        device = cfg.router_device if cfg.router_device != "auto" else (
            "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        shared_memory = shared_kind(cfg.shared_memory, device)
        ckpt = Checkpoint(model_dir)
        self.cfg = ckpt.config
        self.model_name, self.deploy_id = os.path.basename(os.path.normpath(model_dir)), deploy_id
        self.shards = shards
        # Handles to the expert deployments: binding them is what makes Serve deploy them; the
        # Serve-handle dispatcher (the Ray-native baseline) calls through them.
        self.expert_handles = dict(zip(shards, experts or []))
        shard_of = {(L, E): name for name, pairs in shards.items() for L, E in pairs}
        self.directory = get_directory(directory)

        async def lookup():
            return await self.directory.table.remote()

        async def forget(address):
            await self.directory.forget.remote(address)

        channel = channel_name(cfg.transport, shared_memory)
        dispatcher = remote_dispatcher(shard_of, lookup, forget, channel=channel, handles=self.expert_handles,
                            wire_dtype=cfg.wire_dtype, credentials=security.expert_channel_credentials(expert_tls),
                            channel_options=security.expert_channel_options(expert_tls),
                            local_hosts=LOOPBACK | {ray.util.get_node_ip_address()},
                            call_timeout_s=cfg.expert_timeout_s, wait_s=cfg.expert_wait_s)
        self.pool = dispatcher.pool
        weights = model.DenseWeights.load(ckpt, dtype=DTYPES[cfg.router_dtype], device=device)
        self.engine = Engine(self.cfg, weights, dispatcher,
                             max_running=cfg.max_running, max_queued=cfg.max_queued, micro_batches=cfg.micro_batches,
                             max_seq_len=cfg.max_seq_len, kv_tokens=cfg.kv_tokens,
                             kv_memory_fraction=cfg.kv_memory_fraction, max_step_tokens=cfg.max_step_tokens,
                             cuda_graphs=cfg.cuda_graphs)
        log.info("router on %s (%s, CUDA_VISIBLE_DEVICES=%s), expert channel: %s, KV pool: %d slots of %d "
                 "positions, CUDA graphs: %s", device, cfg.router_dtype, os.environ.get("CUDA_VISIBLE_DEVICES"),
                 channel, self.engine.pool.n_slots, self.engine.pool.max_len,
                 "on" if self.engine.graphs is not None else "off")
        self.metrics = RouterMetrics(self.engine)  # Prometheus, flushed once a second off the step path

    async def generate(self, prompt: list[int], params: dict, timeout_s: float | None = None):
        """Streams (token_id, finish_reason) pairs."""
        self.metrics.start()
        async for item in self.engine.generate(prompt, SamplingParams(**params), _deadline(timeout_s)):
            yield item

    async def score(self, tokens: list[int], timeout_s: float | None = None) -> torch.Tensor:
        self.metrics.start()
        return await self.engine.score(tokens, _deadline(timeout_s))

    async def ready(self) -> dict[str, int]:
        """Replicas registered per shard (the health check of `moe-serve up` waits for all >= 1)."""
        await self.pool.refresh(force=True)
        return {name: len(self.pool.replicas.get(name, [])) for name in self.shards}

    async def stats(self) -> dict:
        replicas = await self.ready()
        return {"counts": self.engine.stats.counts.tolist(), "tokens": self.engine.stats.tokens,
                "finished": self.engine.finished, **self.engine.load, "steps_cancelled": self.engine.steps_cancelled,
                "expert_calls": self.pool.calls, "expert_retries": self.pool.retries,
                "expert_waits": self.pool.waits,
                "shards": {n: [list(p) for p in pairs] for n, pairs in self.shards.items()},
                "replicas": replicas, "top_k": self.cfg.top_k, "model": self.model_name,
                "deploy_id": self.deploy_id}

    async def check_health(self):
        if self.engine._loop_task is not None and self.engine._loop_task.done() and not self.engine._loop_task.cancelled():
            raise RuntimeError(f"engine loop stopped: {self.engine._loop_task.exception()!r}")


def channel_name(transport: str, shared_memory: str) -> str:
    """The expert channel (router_service/channels) the config's `transport` and (resolved)
    `shared_memory` name: "handle", a same-node session kind, or "grpc" (bytes)."""
    return "handle" if transport == "handle" else shared_memory or "grpc"


def shared_kind(shared_memory: str, device: str) -> str:
    """The router's same-node sessions: "auto" is CUDA IPC from a GPU router, /dev/shm from a CPU one;
    "" turns them off (every tensor as bytes over gRPC). The value is one RouterConfig allows."""
    on_gpu = torch.device(device).type == "cuda"
    if shared_memory == "cuda_ipc" and not on_gpu:
        raise ValueError("shared_memory: cuda_ipc needs the router on a GPU (num_gpus on its deployment)")
    if shared_memory == "auto":
        return "cuda_ipc" if on_gpu else "shm"
    return shared_memory


def _deadline(timeout_s: float | None) -> float | None:
    return time.monotonic() + timeout_s if timeout_s else None
