"""The heatmap, `moe-serve plan` from a counts file, and the load generator's traffic and reports
(the commands against a running cluster are in test_autoscaling.py)."""
from __future__ import annotations

import asyncio
import json

import matplotlib.image
import numpy as np
import pytest

from moe_serve.cli import main
from router_service.engine import local_engine
from moe_serve.loadgen import expert_affinity, hot_tokens, run_load
from moe_serve.plots import heatmap, replica_grid
from tests.cluster_fixtures import free_port
from tests.conftest import run

STATS = {"tokens_per_expert": [[100, 10, 10, 10, 10, 10, 10, 10], [80, 20, 10, 10, 10, 10, 10, 10]],
         "replicas": {f"expert-{e}": 1 for e in range(8)} | {"expert-0": 3}}


def test_heatmap_draws_counts_and_replicas(tmp_path):
    png = tmp_path / "heat.png"
    assert heatmap(STATS, str(png)) == str(png)
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100  # wide: counts and replicas side by side
    other = tmp_path / "even.png"
    heatmap({"tokens_per_expert": [[10] * 8] * 2, "replicas": STATS["replicas"]}, str(other))
    assert not np.array_equal(matplotlib.image.imread(other), img)  # the picture follows the counts
    with pytest.raises(ValueError, match="non-empty"):
        heatmap({"tokens_per_expert": []}, str(tmp_path / "x.png"))


def test_replica_grid_follows_deployment_names():
    grid = replica_grid({"expert-1": 2, "expert-0-layers-0-1": 3, "expert-0-layers-2-3": 1}, 4, 2)
    assert grid.tolist() == [[3, 2], [3, 2], [1, 2], [1, 2]]


def test_plan_command_table_and_json(tmp_path, capsys):
    counts = tmp_path / "stats.json"
    counts.write_text(json.dumps(STATS))
    assert main(["plan", "--budget", "12", "--counts", str(counts), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["replicas"]["expert-0"] == 5 and sum(p["replicas"].values()) == 12
    assert p["current"]["expert-0"] == 3
    assert p["imbalance_after"][0] < p["imbalance_before"][0]

    assert main(["plan", "--budget", "12", "--counts", str(counts)]) == 0
    table = capsys.readouterr().out
    assert "expert-0" in table and "imbalance max/mean per layer, planned: 1.41 1.50" in table

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(STATS["tokens_per_expert"]))
    assert main(["plan", "--budget", "9", "--counts", str(bare), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["replicas"]["expert-0"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--budget", "4"], "cannot give 8 shards"),
    (["--budget", "12", "--max-replicas", "0"], "max"),
])
def test_plan_command_errors(tmp_path, capsys, argv, message):
    counts = tmp_path / "stats.json"
    counts.write_text(json.dumps(STATS))
    assert main(["plan", "--counts", str(counts), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-serve plan: error:") and message in err and "Traceback" not in err


def test_plan_command_refuses_bad_files(tmp_path, capsys):
    for text in ("not json", '{"replicas": {}}', '[[1, 2], [3]]', '{"tokens_per_expert": [[1]], "replicas": {"x": 1}}'):
        f = tmp_path / "c.json"
        f.write_text(text)
        assert main(["plan", "--budget", "4", "--counts", str(f)]) == 2
        assert "moe-serve plan: error:" in capsys.readouterr().err


def test_hot_prompts_route_to_the_hot_expert(tiny_model):
    engine = local_engine(tiny_model)
    cfg = engine.cfg
    for expert in (0, 5):
        hot = hot_tokens(tiny_model, expert, count=4)
        score = expert_affinity(tiny_model, expert, hot)
        assert (score[:, 0] == cfg.n_layers).all()  # the best tokens pick the expert at every layer
        before = engine.stats.counts.copy()
        for t in hot:  # a repeated token routes like the token alone, at every position
            run(engine.score([t] * 6))
        routed = engine.stats.counts - before
        assert (routed[:, expert] == 6 * len(hot)).all()
        assert routed.sum() == 6 * len(hot) * cfg.n_layers * cfg.top_k
    with pytest.raises(ValueError, match="out of range"):
        hot_tokens(tiny_model, cfg.n_experts)


def test_load_reports_errors_from_an_unreachable_gateway():
    report = run(run_load(f"127.0.0.1:{free_port()}", rps=20, duration_s=0.5, concurrency=4, timeout_s=5))
    assert report["requests"] == 10 and report["ok"] == 0
    assert report["failed"] == 10 and report["errors"] == {"UNAVAILABLE": 10}
    assert report["latency_s"]["p50"] is None and report["tokens_per_s"] == 0


def test_load_stops_early_and_by_itself():
    async def stopped():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        return await run_load(f"127.0.0.1:{free_port()}", rps=10, duration_s=30, stop=stop, timeout_s=2)
    report = run(stopped())
    assert report["duration_s"] < 5 and 2 <= report["requests"] <= 5


@pytest.mark.parametrize("argv, message", [
    (["--skew", "0.5"], "--skew needs --model"),
    (["--skew", "1.5", "--model", "MODEL"], "skew must be in [0, 1]"),
    (["--rps", "0"], "rps and duration must be > 0"),
    (["--skew", "0.5", "--hot-expert", "9", "--model", "MODEL"], "out of range"),
])
def test_load_command_refuses_bad_arguments(tiny_model, capsys, argv, message):
    argv = [str(tiny_model) if a == "MODEL" else a for a in argv]
    base = ["load", "--address", f"127.0.0.1:{free_port()}", "--duration", "1"]
    if "--rps" not in argv:
        base += ["--rps", "1"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
