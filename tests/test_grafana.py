"""cluster/grafana-moe.json: the panels the per-expert view needs, and on a running app every metric
a panel queries is exported by Ray's metrics agent, with the labels the panel groups and selects by."""
from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

DASHBOARD = json.loads((Path(__file__).resolve().parent.parent / "cluster" / "grafana-moe.json").read_text())
SELECTOR = re.compile(r"\b(ray_\w+)(?:\{([^}]*)\})?")


def exprs() -> list[str]:
    return [t["expr"].replace("$application", "moe") for p in DASHBOARD["panels"] for t in p["targets"]]


def test_the_panels_the_issue_asks_for():
    titles = " / ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for words in ("tokens routed per expert", "replicas per expert", "imbalance per layer", "latency"):
        assert words in titles, titles
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} >= {"datasource"}
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)
    for e in exprs():
        assert SELECTOR.search(e), e  # every query reads at least one of Ray's metrics


def scrape(port: int) -> list[tuple[str, dict]]:
    """(metric name, labels) of every series Ray's metrics agent exports."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for m in re.finditer(r"^(\w+)(?:\{(.*?)\})? \S+$", text, re.M):
        out.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))))
    return out


def missing(series: list[tuple[str, dict]]) -> list[str]:
    """What the dashboard queries and the endpoint does not have: a metric, a series its selector
    matches, or a label its expression groups by."""
    gaps = []
    for e in exprs():
        found = []
        for name, matchers in SELECTOR.findall(e):
            want = re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers)
            hits = [labels for n, labels in series if n == name and all(
                re.fullmatch(v, labels.get(k, "")) if op == "=~" else labels.get(k) == v for k, op, v in want)]
            if not hits:
                gaps.append(f"{name}{{{matchers}}}")
            found += hits
        for group in re.findall(r"by \(([^)]*)\)", e):
            for label in (x.strip() for x in group.split(",")):
                if found and not any(label in labels for labels in found):
                    gaps.append(f"label {label} in {e}")
    return gaps


def test_the_check_names_what_is_not_there():
    names = {n for e in exprs() for n, _ in SELECTOR.findall(e)}
    assert {g.split("{")[0] for g in missing([])} == names
    series = [(n, {"layer": "0", "expert": "0", "shard": "expert-0", "le": "1", "state": "running",
                   "application": "moe", "deployment": "expert-0"}) for n in names]
    assert missing(series) == []
    other_app = [(n, labels | {"application": "other"}) for n, labels in series]
    assert missing(other_app) == ['ray_serve_deployment_replica_healthy{application="moe", deployment=~"expert-.*"}']
    no_layer = [(n, {k: v for k, v in labels.items() if k != "layer"}) for n, labels in series]
    assert any(g.startswith("label layer") for g in missing(no_layer))


@pytest.mark.cluster
def test_every_queried_metric_is_exported(tmp_path):
    import ray

    from moe_serve import client
    from router_service.sampling import SamplingParams
    from tests.cluster_fixtures import free_port, running_app
    from tests.reliability_helpers import experts, small_model, wait_until

    old = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # read when Ray starts
    try:
        with running_app(small_model(tmp_path / "small"), edit=experts(2), http_port=free_port()) as (address, _):
            port = ray._private.worker.global_worker.node.metrics_export_port
            for i in range(4):
                client.generate(address, prompt_ids=[5 + i, 6, 7], params=SamplingParams(max_new_tokens=8))
            last = []

            def complete():
                last[:] = missing(scrape(port))
                return not last
            try:
                wait_until(complete, 120, "every metric the dashboard queries")
            except AssertionError:
                raise AssertionError(f"not exported: {last}") from None
    finally:
        if old is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = old
