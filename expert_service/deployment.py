"""The expert replica as a Ray Serve deployment: load one shard, serve ExpertService on this
node's address, register in the directory, report load to Serve's autoscaler.

One deployment per shard (moe_core/shards.py names them). Placement (`num_gpus`) comes from the
deployment's `ray_actor_options`, so Ray sets CUDA_VISIBLE_DEVICES and this code just uses cuda.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
import ray
import torch
from ray import serve

from expert_service.autoscaling import LoadMeter
from expert_service.directory import DEFAULT_NAME, HEARTBEAT_S, get_directory
from expert_service.experts import ExpertShard
from expert_service.server import ExpertServicer, start_server
from moe_core.checkpoint import Checkpoint
from moe_core.codec import DTYPES

log = logging.getLogger("ray.serve")



def server_credentials(tls: dict | None) -> grpc.ServerCredentials | None:
    """Router <-> expert mTLS, server side: `tls` = {ca, cert, key} PEM paths; only clients with a
    certificate the CA signed get through. None: plaintext."""
    if not tls:
        return None
    pem = {k: Path(tls[k]).read_bytes() for k in ("ca", "cert", "key")}
    return grpc.ssl_server_credentials([(pem["key"], pem["cert"])], root_certificates=pem["ca"],
                                       require_client_auth=True)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=2, graceful_shutdown_timeout_s=20)
class ExpertReplica:
    async def __init__(self, model: str, shard: str, pairs: list, directory: str = DEFAULT_NAME,
                   dtype: str = "float32", drain_s: float = 2.5, tls: dict | None = None):
        self.shard_name, self.drain_s = shard, drain_s
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        weights = ExpertShard.load(Checkpoint(model), [tuple(p) for p in pairs], device=device, dtype=DTYPES[dtype])
        self.servicer = ExpertServicer(weights)
        self.meter = LoadMeter(self.servicer)
        # The data plane listens on this node's own address only, never on all interfaces.
        self.host = ray.util.get_node_ip_address()
        # With mTLS, only a certificate naming the router's role gets in, not any the CA signed.
        self.server, port = await start_server(self.servicer, host=self.host, credentials=server_credentials(tls),
                                               client_role=(tls or {}).get("client_role", "moe-router") if tls else None)
        self.address = f"{self.host}:{port}"
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.directory = get_directory(directory)
        await self.directory.register.remote(shard, self.replica_id, self.address)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        log.info("expert shard %s serving %d pairs at %s on %s (CUDA_VISIBLE_DEVICES=%s)", shard, len(pairs),
                 self.address, device, os.environ.get("CUDA_VISIBLE_DEVICES"))

    async def _beat(self):
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.directory.register.remote(self.shard_name, self.replica_id, self.address)
            except Exception as e:  # the directory restarts on its own; keep beating
                log.warning("heartbeat to the expert directory failed: %s", e)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """rows_per_s, busy, calls/rows in flight: expert_service.autoscaling says which scales."""
        return self.meter.sample()

    def info(self) -> dict:
        return {"shard": self.shard_name, "address": self.address,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "calls": self.servicer.calls,
                "node_id": ray.get_runtime_context().get_node_id()}

    async def forward(self, x_TH: torch.Tensor, segments: list) -> torch.Tensor:
        """The Ray-native path (Serve handle, Ray's own serialization): checked and counted for
        autoscaling like an ExpertService call; bad input raises WireError (a ValueError)."""
        return await self.servicer.forward_tensor(x_TH, [tuple(s) for s in segments])

    async def __del__(self):
        """Scale-down drain: leave the directory, let routers notice, finish in-flight calls, stop."""
        self._heartbeat.cancel()
        try:
            await self.directory.deregister.remote(self.shard_name, self.replica_id)
        except Exception:
            pass
        await asyncio.sleep(self.drain_s)
        await self.server.stop(grace=10)
        self.servicer.close()
