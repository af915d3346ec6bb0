"""`make bench`: every benchmark in turn (codec, moe_layer, decode_floor, decode, e2e), then BENCHMARKS.md.

A benchmark that fails does not stop the others; the exit status says whether all ran. On a
machine with CUDA, moe_layer runs on the GPU at Mixtral-8x7B shapes in bfloat16 (every transport)
and is saved as `moe_layer__<gpu>`, and expert_math and call_overhead run too; on CPU moe_layer
also runs the Ray Serve handle baseline. Extra arguments for one script: --args NAME="...".

    python -m benchmarks.run_all [--only codec,moe_layer,decode_floor,decode,e2e] [--args e2e="--concurrency 1,8"] [--out FILE]
"""
from __future__ import annotations

import argparse
import functools
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
ORDER, GPU_ONLY = report.ORDER, report.GPU_ONLY  # GPU_ONLY runs too when this machine has a GPU


@functools.cache
def gpu_name() -> str | None:
    """A short name for the GPU ("h200"), None without one: GPU results are saved as variants."""
    import torch
    return torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else None


def default_args(name: str) -> list[str]:
    gpu = gpu_name()
    if name == "moe_layer" and gpu:
        return ["--preset", "mixtral-8x7b", "--device", "cuda", "--dtype", "bfloat16", "--tokens",
                "1,64,512,1024,4096,8192", "--transports", "inprocess,grpc/1,cuda_ipc/1,grpc,shm,cuda_ipc",
                "--name", f"moe_layer__{gpu}"]
    if name == "moe_layer":
        return ["--transports", "inprocess,grpc,shm,handle"]
    if name == "decode" and not gpu:  # the bench preset on a small CPU: a shorter sweep
        return ["--batches", "1,8,32", "--contexts", "128", "--new-tokens", "32", "--repeats", "2",
                "--systems", "transformers,in-process,served", "--served-batches", "1,8,32"]
    if name == "decode" and gpu:
        return ["--systems", "transformers,in-process,eager,served"]
    if name in ("expert_math", "call_overhead") and gpu:
        return ["--name", f"{name}__{gpu}"]
    if name == "call_overhead":  # eight Mixtral-8x7B experts in float32 would not fit a small CPU box
        return ["--preset", "bench", "--device", "cpu", "--name", "call_overhead"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ORDER + (GPU_ONLY if gpu_name() else [])))
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the report to write")
    p.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                   help="extra arguments for one benchmark, e.g. e2e=\"--concurrency 1,8\"")
    a = p.parse_args(argv)
    names = a.only.split(",")
    unknown = [n for n in names if n not in ORDER + GPU_ONLY]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ORDER + GPU_ONLY)}")
    extra = {}
    for item in a.args:
        name, _, text = item.partition("=")
        if name not in ORDER + GPU_ONLY:
            p.error(f"--args {item!r}: NAME must be one of {', '.join(ORDER + GPU_ONLY)}")
        extra[name] = shlex.split(text)
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *default_args(name), *extra.get(name, [])]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    report.main(["--out", str(a.out)])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
