"""What every benchmark shares: timing, the machine description, results as JSON and a table."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moe_core.codec import keep_large_buffers  # noqa: F401  (re-exported for the benchmarks)

# MOE_BENCH_RESULTS redirects results (the tests write theirs to a temporary directory).
RESULTS = Path(os.environ.get("MOE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    import torch
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


async def time_async(fn, *, iters: int, warmup: int = 2, sync=None) -> dict:
    """Median, p90 and p99 wall time in ms of `await fn()`; `sync()` runs before each clock read (cuda)."""
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(iters):
        if sync:
            sync()
        t0 = time.perf_counter()
        await fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "p99_ms": times[int(0.99 * (len(times) - 1))], "iters": iters}


def iters_for(ms_estimate: float, budget_s: float = 3.0, lo: int = 3, hi: int = 200) -> int:
    return max(lo, min(hi, int(budget_s * 1e3 / max(ms_estimate, 1e-3))))


async def measure(fn, *, sync=None, budget_s: float = 3.0, warmup: int = 1, max_iters: int = 200) -> dict:
    """time_async with as many iterations as fit in about budget_s (at most max_iters), from two
    timed tries."""
    est = (await time_async(fn, iters=2, warmup=warmup, sync=sync))["ms"]
    return await time_async(fn, iters=iters_for(est, budget_s, hi=max_iters), sync=sync)


def save(name: str, rows: list[dict], meta: dict, columns: list[str]) -> Path:
    """Writes results/<name>.json; a name like `moe_layer__shm` is a variant of `moe_layer` (report.py
    shows it before/after). meta["tables"] may hold more [{"title", "columns", "rows"}] to show."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **meta, "columns": columns,
                                "rows": rows}, indent=2))
    print(table(rows, columns))
    for t in meta.get("tables", []):
        print(f"\n{t['title']}\n\n{table(t['rows'], t['columns'])}")
    print(f"\nwrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"  # 1234, not 1.23e+03
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


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


def run(coro):
    return asyncio.run(coro)
