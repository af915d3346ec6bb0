"""The benchmark scripts run end to end and write valid JSON; the report computes targets and
before/after rows from what they wrote. No timing is asserted: speed lives in the benchmarks."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    """`run_all` with only a tiny codec run: echo server subprocess, real gRPC, report written."""
    d = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, MOE_BENCH_RESULTS=str(d / "results"))
    out = d / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--only", "codec", "--out", str(out),
                           "--args", "codec=--sizes 128KB,1MB --iters 2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return d / "results", out, proc.stdout


def test_codec_writes_rows_for_every_size_path_and_option(codec_run):
    results, _, stdout = codec_run
    data = json.loads((results / "codec.json").read_text())
    assert data["benchmark"] == "codec" and data["machine"]["cpus"] >= 1
    keys = {(r["MB"], r["options"], r["path"]) for r in data["rows"]}
    assert keys == {(mb, o, p) for mb in (0.125, 1.0) for o in ("tuned", "default")
                    for p in ("codec", "frame", "wire")}
    for r in data["rows"]:
        assert r["rtt_ms"] > 0 and r["GBps_each_way"] > 0 and r["iters"] == 2
        # GB/s each way is the payload over half the round trip
        assert r["GBps_each_way"] == pytest.approx(r["MB"] * 2**20 / (r["rtt_ms"] / 2e3) / 1e9)
        if r["path"] in ("codec", "frame"):
            assert r["rtt_ms"] == pytest.approx(r["encode_ms"] + r["rpc_ms"] + r["decode_ms"], rel=0.5)
            assert r["server_ms"] > 0  # the server really decoded and re-encoded
    steps = data["tables"][0]["rows"]
    assert [s["MB"] for s in steps] == [0.125, 1.0] and all(s["copy_equivalents"] > 0 for s in steps)
    assert "| MB | options | path |" in stdout


def test_report_from_the_codec_run(codec_run):
    results, out, _ = codec_run
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "## codec" in text and "Machine: " in text
    # 128 KB and 1 MB only: the >= 16 MB codec target has nothing to judge yet
    rows = {t["target"]: t for t in report.targets(report.load(results))}
    assert all(t["result"] == "not measured" for t in rows.values())
    assert "No variant results yet" in text


def _results(tmp_path, codec_json: dict) -> Path:
    """A results dir with the real codec results plus moe_layer/e2e results shaped as the scripts write them."""
    d = tmp_path / "results"
    d.mkdir()
    (d / "codec.json").write_text(json.dumps(codec_json))
    machine = codec_json["machine"]
    moe = {"benchmark": "moe_layer", "machine": machine, "device": "cpu", "columns": ["T", "transport", "ms", "ratio"],
           "rows": [{"T": 8, "transport": "inprocess", "ms": 2.0, "ratio": 1.0},
                    {"T": 8, "transport": "grpc", "ms": 8.0, "ratio": 4.0},
                    {"T": 512, "transport": "inprocess", "ms": 10.0, "ratio": 1.0},
                    {"T": 512, "transport": "grpc", "ms": 11.0, "ratio": 1.1}]}
    e2e = {"benchmark": "e2e", "machine": machine, "rows": [
        {"batch": 32, "system": "transformers (eager)", "tokens_per_s": 100.0},
        {"batch": 32, "system": "moe-serve", "tokens_per_s": 160.0, "ratio": 1.6}]}
    (d / "moe_layer.json").write_text(json.dumps(moe))
    (d / "e2e.json").write_text(json.dumps(e2e))
    faster = copy.deepcopy(moe) | {"benchmark": "moe_layer__shm", "note": "shared memory"}
    for r in faster["rows"]:
        r["ms"] /= 2
    (d / "moe_layer__shm.json").write_text(json.dumps(faster))
    return d


def test_targets_and_optimizations_are_computed_from_the_json(codec_run, tmp_path):
    results, _, _ = codec_run
    codec = json.loads((results / "codec.json").read_text())
    big = copy.deepcopy(codec)
    big["rows"] = [dict(r, MB=16.0, GBps_each_way=g) for r, g in zip(
        [r for r in codec["rows"] if r["path"] == "frame" and r["options"] == "tuned"], (0.7, 2.0))]
    d = _results(tmp_path, big)
    got = {t["target"]: t["result"] for t in report.targets(report.load(d))}
    assert [r for t, r in got.items() if t.startswith("e2e")] == ["pass"]
    assert [r for t, r in got.items() if t.startswith("moe_layer") and "CPU" in t] == ["pass", "FAIL"]  # T=512, T=8
    assert [r for t, r in got.items() if t.startswith("the bytes channel")] == ["FAIL"]  # 0.7 GB/s at 16 MB
    assert {r for t, r in got.items() if "GPU" in t} == {"not measured"}  # no GPU run among these results

    out = tmp_path / "B.md"
    report.main(["--results", str(d), "--out", str(out)])
    text = out.read_text()
    assert "### moe_layer__shm: shared memory" in text
    # before/after rows: 8 ms -> 4 ms at T=8 over gRPC, half the time, better
    assert "| 8 / grpc | 8 | 4 | 0.5 | yes |" in text
    assert text.index("## codec") < text.index("## moe_layer") < text.index("## e2e") < text.index("## Optimizations")


def test_report_rejects_a_results_file_without_rows(tmp_path):
    (tmp_path / "codec.json").write_text(json.dumps({"benchmark": "codec"}))
    with pytest.raises(ValueError, match="no 'rows' list"):
        report.load(tmp_path)


def test_multi_gpu_placements_cover_every_expert_gpu_count():
    from benchmarks.multi_gpu import placements
    assert placements(1) == [("experts on GPU 0", "shared", [0])]
    four = placements(4)
    assert [gpus for _, _, gpus in four] == [[0], [1], [1, 2], [1, 2, 3], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert all(0 not in gpus for _, family, gpus in four if family == "router alone")


def test_multi_gpu_skew_makes_the_expert_hot_and_efficiency_divides_by_gpus():
    import torch

    from benchmarks.multi_gpu import _efficiency, skew
    from router_service import model
    g = torch.Generator().manual_seed(0)
    gate_EH, x_TH = torch.randn(8, 64, generator=g), torch.randn(512, 64, generator=g)
    _, idx = model.route(x_TH, gate_EH, 2)
    assert (idx == 3).any(-1).float().mean() < 0.5
    hot_TH, share = skew(x_TH, gate_EH, 2, 3, 0.9)
    _, idx = model.route(hot_TH, gate_EH, 2)
    assert share >= 0.9 and (idx == 3).any(-1).float().mean().item() == share

    rows = [{"T": 8, "concurrency": 1, "family": "shared", "expert_gpus": 1, "tokens_per_s": 100.0},
            {"T": 8, "concurrency": 1, "family": "shared", "expert_gpus": 2, "tokens_per_s": 150.0},
            {"T": 8, "concurrency": 1, "family": "inprocess", "expert_gpus": 1, "tokens_per_s": 90.0}]
    assert [r.get("scaling_eff") for r in _efficiency(rows)] == [1.0, 0.75, None]


def test_chunked_prefill_rows_and_target(tmp_path):
    """A short prompt, two budgets: one chunked into several steps, one whole; the target row reads them."""
    env = dict(os.environ, MOE_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.chunked_prefill", "--budgets", "32,8192",
                           "--prompt-len", "300"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "chunked_prefill.json").read_text())["rows"]
    assert [r["max_step_tokens"] for r in rows] == [32, 8192]
    assert rows[0]["joining_steps"] >= 300 // 31 and rows[1]["joining_steps"] <= 2
    assert all(r["alone_p50_ms"] > 0 and r["ratio_p50"] > 0 and r["prompt_ttft_ms"] > 0 for r in rows)
    target = next(t for t in report.targets(report.load(tmp_path)) if t["target"].startswith("decode token gap"))
    assert target["result"] in ("pass", "FAIL") and "max_step_tokens" in target["measured"]


def test_expert_processes_rows_for_each_split(tmp_path):
    """The tiny preset's experts in one and in two servers: a row each beside the in-process math."""
    env = dict(os.environ, MOE_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.expert_processes", "--preset", "tiny", "--rows", "2",
                           "--servers", "1,2", "--steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "expert_processes.json").read_text())["rows"]
    assert [(r["servers"], r["system"]) for r in rows] == [(0, "in-process"), (1, "served (shm)"), (2, "served (shm)")]
    assert all(r["step_ms"] > 0 for r in rows)
