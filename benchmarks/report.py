"""Renders BENCHMARKS.md from benchmarks/results/*.json: the targets with pass/fail computed from
the figures, one section per benchmark (machine, date, table), and an "Optimizations" section
with before/after rows for every variant file `<benchmark>__<variant>.json` (compared with
`<benchmark>.json`, or with the results named by the variant's `compare_to`).

    python -m benchmarks.report [--results benchmarks/results] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from benchmarks.common import RESULTS, table

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
ORDER = ["codec", "call_overhead", "expert_processes", "moe_layer", "decode_floor", "decode", "chunked_prefill", "e2e"]
GPU_ONLY = ["expert_math", "multi_gpu"]

# How a variant is compared with its base: the columns that identify a row, the figure, and whether
# higher is better. The transformers row's label carries its expert implementation; compare by system.
COMPARE = {
    "codec": (lambda r: (r["MB"], r["options"], r["path"]), "GBps_each_way", True),
    "moe_layer": (lambda r: (r["T"], r["transport"]), "ms", False),
    "e2e": (lambda r: (r["batch"], r["system"].split(" ")[0]), "tokens_per_s", True),
}
META_SKIP = {"benchmark", "machine", "rows", "columns", "tables", "note", "compare_to"}


def load(results: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data.get("rows"), list):
            raise ValueError(f"{path} has no 'rows' list")
        out[path.stem] = data
    return out


def _fmt(v, digits=3) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


# ---- targets ----

def _check(name, measured, goal, ok) -> dict:
    return {"target": name, "measured": measured, "goal": goal,
            "result": "not measured" if ok is None else ("pass" if ok else "FAIL")}


def targets(res: dict[str, dict]) -> list[dict]:
    out = []
    e2e = res.get("e2e")
    row = next((r for r in (e2e or {}).get("rows", []) if r.get("batch") == 32 and "ratio" in r), None)
    for goal in (1.5, 1.0):  # the first served app's goal, then the engine issue's
        out.append(_check("e2e tokens/s at 32 concurrent requests vs transformers generate at batch 32",
                          f"{row['ratio']:.2f}x ({row['tokens_per_s']:.1f} tok/s)" if row else "-", f">= {goal}x",
                          None if row is None else row["ratio"] >= goal))

    rows = (res.get("chunked_prefill") or {}).get("rows", [])
    best = min(rows, key=lambda r: r["ratio_p50"]) if rows else None
    others = ", ".join(f"{r['ratio_p50']:.3g}x at {r['max_step_tokens']}" for r in rows if r is not best)
    out.append(_check("decode token gap (p50) while a 3000-token prompt joins / alone, CPU, tiny preset, best "
                      "max_step_tokens",
                      f"{best['ratio_p50']:.2f}x (max_step_tokens {best['max_step_tokens']}; {others})" if best else "-",
                      "< 2x", None if best is None else best["ratio_p50"] < 2))

    moe = res.get("moe_layer")
    for T, limit in ((512, 1.25), (8, 3.0)):
        name = f"moe_layer gRPC / in-process layer time at T={T}, CPU"
        row = next((r for r in (moe or {}).get("rows", []) if r.get("T") == T and r.get("transport") == "grpc"), None)
        if moe is not None and moe.get("device", "cpu") != "cpu":
            out.append(_check(name, f"ran on {moe['device']}, not CPU", f"<= {limit}x", None))
        else:
            out.append(_check(name, f"{row['ratio']:.2f}x ({row['ms']:.1f} ms)" if row else "-", f"<= {limit}x",
                              None if row is None else row["ratio"] <= limit))

    # The H200 run, and runs of later changes measured against it (compare_to): each target takes its best.
    gpu_runs = {n: d for n, d in res.items()
                if n == "moe_layer__h200" or (n.startswith("moe_layer__h200") and d.get("compare_to") == "moe_layer__h200")}
    rows = [dict(r, run=n) for n, d in gpu_runs.items() for r in d["rows"]]

    def at(T, transport):
        return [r for r in rows if r.get("T") == T and r.get("transport") == transport]
    for transports, limit, what in ((("grpc",), 2.0, "gRPC (bytes)"),
                                    (("cuda_ipc", "cuda_ipc/1", "shm", "grpc/1"), 1.25, "fastest transport")):
        found = [r for t in transports for r in at(1024, t)]
        best = min(found, key=lambda r: r["ratio"]) if found else None
        out.append(_check(f"moe_layer {what} / in-process at T=1024, Mixtral-8x7B bf16 on GPU",
                          f"{best['ratio']:.2f}x ({best['transport']}, {best['ms']:.1f} ms; {best['run']})" if best else "-",
                          f"<= {limit}x", None if best is None else best["ratio"] <= limit))
    math = {}
    for r in rows:  # per T, the best run
        if r.get("transport") == "expert math only" and r.get("T", 0) >= 4096:
            math[r["T"]] = max(math.get(r["T"], r), r, key=lambda m: m["of_gemm_peak"])
    math = [math[T] for T in sorted(math)]
    worst = min(math, key=lambda r: r["of_gemm_peak"]) if math else None
    out.append(_check("expert math / measured bf16 matmul rate at T >= 4096, GPU",
                      ", ".join(f"{r['of_gemm_peak']:.1%} at T={r['T']}" for r in math) or "-", ">= 75%",
                      None if worst is None else worst["of_gemm_peak"] >= 0.75))

    dec = [r for n, d in res.items() if n.startswith("decode__h200") for r in d["rows"]]

    def ours(batch, context):
        return next((r for r in dec if r["system"] == "in-process" and r["batch"] == batch
                     and r["context"] == context), None)
    for batches, context, goal in (((1,), 128, 0.30), ((8, 32, 64, 128), 128, 0.45), ((32,), 2048, 0.30)):
        found = [r for r in map(lambda b: ours(b, context), batches) if r]
        worst = min(found, key=lambda r: r["floor_fraction"]) if found else None
        out.append(_check(f"decode, in-process engine: tokens/s over the HBM floor at batch "
                          f"{'/'.join(map(str, batches))}, context {context}, Mixtral-8x7B layers bf16 on the H200",
                          ", ".join(f"{r['floor_fraction']:.2f} (batch {r['batch']})" for r in found) or "-",
                          f">= {goal}", None if worst is None else worst["floor_fraction"] >= goal))
    row, hf = ours(32, 128), next((r for r in dec if r["system"].startswith("transformers") and r["batch"] == 32
                                   and r["context"] == 128), None)
    ratio = row["tokens_per_s"] / hf["tokens_per_s"] if row and hf else None
    out.append(_check("decode, in-process engine / transformers generate, tokens/s at batch 32, context 128, H200",
                      f"{ratio:.2f}x ({row['tokens_per_s']:.0f} vs {hf['tokens_per_s']:.0f})" if ratio else "-",
                      ">= 10x", None if ratio is None else ratio >= 10))

    out += crossing_targets(res, dec)

    codec = res.get("codec")
    rows = [r for r in (codec or {}).get("rows", [])
            if r.get("path") == "frame" and r.get("options") == "tuned" and r.get("MB", 0) >= 16]
    worst = min(rows, key=lambda r: r["GBps_each_way"]) if rows else None
    out.append(_check("the bytes channel (ForwardFrame) each way, loopback (tuned, tensors >= 16 MB)",
                      f"{worst['GBps_each_way']:.3g} GB/s (at {worst['MB']:g} MB)" if worst else "-", ">= 1 GB/s",
                      None if worst is None else worst["GBps_each_way"] >= 1.0))
    return out


def crossing_targets(res: dict[str, dict], dec: list[dict]) -> list[dict]:
    """A one-row call's p50 over the same-node session (CUDA IPC on the H200, /dev/shm on CPU),
    and the served path's tokens/s against the in-process engine's from the same decode run."""
    out = []
    for name, transport, goal, where in (("call_overhead__h200", "cuda_ipc", 100, "CUDA IPC, H200, Mixtral-8x7B expert"),
                                         ("call_overhead", "shm", 150, "/dev/shm, CPU, bench-preset expert")):
        rows = res.get(name, {}).get("rows", [])
        call = next((r for r in rows if r.get("call") == "forward" and r.get("transport") == transport
                     and r.get("rows") == 1 and "p50_us" in r), None)
        math = next((r for r in rows if r.get("call") == "math" and r.get("rows") == 1), None)
        measured = "-" if call is None else f"{call['p50_us']:.0f} us" + (
            f" (its math alone {math['p50_us']:.0f} us)" if math else "")
        out.append(_check(f"one-row expert call p50 over {where}", measured, f"<= {goal} us",
                          None if call is None else call["p50_us"] <= goal))
    runs = {}
    for n, d in res.items():
        if n.startswith("decode__") and d["machine"].get("device", "").startswith("NVIDIA"):  # any GPU run
            systems = {r["system"].split(" ")[0] for r in d["rows"]}
            if {"in-process", "served"} <= systems:  # the newest; of one day's, the one with most batches
                served = sum(r["system"].startswith("served") for r in d["rows"])
                runs[(d["machine"].get("date", ""), served, n)] = d
    latest = runs[max(runs)] if runs else None
    ratios = []
    for r in (latest or {}).get("rows", []):
        if r["system"].startswith("served") and r["context"] == 128:
            base = next((b for b in latest["rows"] if b["system"] == "in-process" and b["batch"] == r["batch"]
                         and b["context"] == 128), None)
            if base:
                ratios.append((r["batch"], r["tokens_per_s"] / base["tokens_per_s"]))
    out.append(_check("decode, served (8 expert processes, CUDA IPC, MPS) / in-process engine, tokens/s, "
                      "context 128, GPU" + (f" ({max(runs)[2]}: {latest['machine']['device']})" if runs else ""),
                      ", ".join(f"{x:.0%} (batch {b})" for b, x in ratios) or "-", ">= 80% at every batch",
                      None if not ratios else min(x for _, x in ratios) >= 0.8))
    return out


# ---- sections ----

def _doc(name: str) -> str:
    """A benchmark script's docstring, read without importing the script."""
    path = HERE / f"{name}.py"
    return (ast.get_docstring(ast.parse(path.read_text())) or "") if path.is_file() else ""


def question(name: str) -> str:
    return " ".join(_doc(name).split("\n\n")[0].split())


def usage(name: str) -> str:
    """The docstring's last paragraph when it is the command line."""
    last = _doc(name).rstrip().split("\n\n")[-1].strip()
    return last if last.startswith("python -m") else ""


def _setting(v) -> str:
    if isinstance(v, (dict, list)):
        text = json.dumps(v)
        return text if len(text) <= 200 else "(in the JSON)"
    return _fmt(v)


def _where(data: dict) -> str:
    m = data.get("machine", {})
    return f"{m.get('device', '?')}, {m.get('date', '?')}"


def machine_line(data: dict) -> str:
    m = data.get("machine", {})
    return (f"Machine: {m.get('device', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}, "
            f"Python {m.get('python', '?')}; run on {m.get('date', '?')}.")


def rows_table(data: dict) -> str:
    if not data["rows"]:
        return "(no rows)"
    return table(data["rows"], data.get("columns") or list(data["rows"][0]))


def section(name: str, data: dict) -> list[str]:
    lines = [f"## {name}", ""]
    q = question(name.split("__")[0])
    if q:
        lines += [q, ""]
    lines += [machine_line(data), ""]
    settings = [f"{k} = {_setting(v)}" for k, v in data.items() if k not in META_SKIP and v is not None]
    if settings:
        lines += ["Settings: " + ", ".join(settings) + ".", ""]
    lines += [rows_table(data), ""]
    for t in data.get("tables", []):
        lines += [f"{t['title']}:", "", table(t["rows"], t["columns"]), ""]
    return lines


def compare(base: dict, variant: dict, family: str) -> list[dict] | None:
    if family not in COMPARE:
        return None
    key, metric, higher = COMPARE[family]
    before = {key(r): r[metric] for r in base["rows"] if metric in r}
    rows = []
    for r in variant["rows"]:
        k = key(r)
        if k in before and metric in r and before[k]:
            change = r[metric] / before[k]
            better = change > 1 if higher else change < 1
            rows.append({"row": " / ".join(map(_fmt, k)), "before": before[k], "after": r[metric],
                         "after/before": change, "better": "yes" if better else "no"})
    return rows


def optimizations(res: dict[str, dict]) -> list[str]:
    lines = ["## Optimizations", ""]
    # A variant is a run compared with another: `<benchmark>__<variant>`, or any run naming its
    # "before" in compare_to. A "before" run that names none of its own is shown only as that.
    befores = {d.get("compare_to") for d in res.values()}
    variants = [n for n, d in res.items() if n.split("__")[0] in COMPARE
                and (d.get("compare_to") or ("__" in n and n not in befores))]
    if not variants:
        return lines + ["No variant results yet: a run saved as `<benchmark>__<variant>.json` (the scripts' "
                        "`--name`, with `--note` saying what it changes) appears here next to its base run.", ""]
    lines += ["Each variant next to the run it changes (\"before\" = the base results file, \"after\" = the "
              "variant), on the figure that matters for that benchmark.", ""]
    for name in variants:
        data = res[name]
        family = name.split("__")[0]
        base_name = data.get("compare_to") or family
        lines += [f"### {name}" + (f": {data['note']}" if data.get("note") else ""), ""]
        base = res.get(base_name)
        rows = compare(base, data, family) if base else None
        if not rows:
            why = f"no `{base_name}.json` to compare with" if base is None else "no rows in common with the base"
            lines += [f"({why}; the variant's own figures:)", "", rows_table(data), ""]
            continue
        metric = COMPARE[family][1]
        lines += [f"`{metric}`: before = `{base_name}` ({_where(base)}), after = `{name}` ({_where(data)})."]
        if base.get("machine", {}).get("device") != data.get("machine", {}).get("device"):
            lines[-1] += " Different machines: this compares hardware, not one change."
        lines += ["", table(rows, ["row", "before", "after", "after/before", "better"]), ""]
    return lines


def render(res: dict[str, dict]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by hand. "
             "`make bench` (`python -m benchmarks.run_all`) reruns every benchmark and this page. Each script "
             "answers one question, prints its table and writes its JSON; ratios compare figures from the "
             "same run on the same machine.", "",
             "## Targets", "", table(targets(res), ["target", "measured", "goal", "result"]), "",
             "## Running", "",
             "A run saved with `--name <benchmark>__<variant>` (and `--note` saying what it changes) shows up "
             "under Optimizations next to the base run.", "", "```sh",
             "make bench   # everything below, then this page"]
    lines += [u for u in map(usage, ORDER + ["run_all", "report"]) if u]
    lines += ["```", "", "GPU-only questions (run on the lent H200, not part of `make bench`):", "", "```sh"]
    lines += [u for u in map(usage, GPU_ONLY) if u]
    lines += ["```", ""]
    # Results of benchmarks that have no before/after figure (GPU-only questions) are sections of their own.
    own = [n for n in res if n not in ORDER and n.split("__")[0] not in COMPARE]
    bases = [n for n in ORDER if n in res] + sorted(n for n in res if "__" not in n and n not in ORDER) \
        + sorted(n for n in own if "__" in n)
    for name in bases:
        lines += section(name, res[name])
    lines += optimizations(res)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args(argv)
    a.out.write_text(render(load(a.results)))
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main()
