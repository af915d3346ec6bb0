"""What every benchmark shares: timing, the machine description, results as JSON and a table."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import statistics
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


def process_cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system) process `pid` has used so far, from /proc; OSError once it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def run(coro):
    return asyncio.run(coro)
