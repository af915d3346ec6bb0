"""Expert servers as processes of their own (`python -m expert_service`), for tests and benchmarks
that need real replicas without a Ray cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys


class ExpertServers:
    """`python -m expert_service` subprocesses, one per shard, started together; a context manager
    that stops them. `gpus` pins a shard's server to one physical GPU the way Ray does
    (CUDA_VISIBLE_DEVICES), so it computes on its "cuda" and sees no other GPU."""

    def __init__(self, model_dir, shards: dict[str, list[int]], *, device="cpu", dtype="float32", threads=None,
                 gpus: dict[str, int] | None = None, args: list[str] = ()):
        self.procs, self.addresses = [], {}
        # The cores shared out: OpenMP threads left spinning in idle servers slow the busy one.
        threads = self.threads = threads or max(1, (os.cpu_count() or 1) // len(shards))
        for name, experts in shards.items():
            cmd = [sys.executable, "-m", "expert_service", "--model", str(model_dir), "--experts",
                   ",".join(map(str, experts)), "--device", device, "--dtype", dtype, "--threads", str(threads),
                   *args]
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpus[name])) if gpus and name in gpus else None
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        for name, p in zip(shards, self.procs):
            line = p.stdout.readline()
            if not line:
                self.close()
                raise RuntimeError(f"expert server for {name} did not start")
            info = json.loads(line)
            self.addresses[name] = f"{info['host']}:{info['port']}"

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
