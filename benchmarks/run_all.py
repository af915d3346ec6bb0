"""`make bench`: every benchmark in turn (codec, moe_layer, e2e), then BENCHMARKS.md.

A benchmark that fails does not stop the others; the exit status says whether all ran. On a
machine with CUDA, moe_layer runs on the GPU in bfloat16 (in-process and gRPC); on CPU it also
runs the Ray Serve handle baseline. Extra arguments for one script: --args NAME="...".

    python -m benchmarks.run_all [--only codec,moe_layer,e2e] [--args e2e="--concurrency 1,8"] [--out FILE]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["codec", "moe_layer", "e2e"]


def default_args(name: str) -> list[str]:
    if name == "moe_layer":
        import torch
        if torch.cuda.is_available():
            return ["--device", "cuda", "--dtype", "bfloat16", "--transports", "inprocess,grpc"]
        return ["--transports", "inprocess,grpc,handle"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ORDER))
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the report to write")
    p.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                   help="extra arguments for one benchmark, e.g. e2e=\"--concurrency 1,8\"")
    a = p.parse_args(argv)
    names = a.only.split(",")
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    extra = {}
    for item in a.args:
        name, _, text = item.partition("=")
        if name not in ORDER:
            p.error(f"--args {item!r}: NAME must be one of {', '.join(ORDER)}")
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
