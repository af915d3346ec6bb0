"""Capacity planning: routing traces on disk (msgpack), the simulator's predictions, its CLI."""
from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest

from moe_core.config import preset
from moe_serve.cli import main
from moe_serve.record import Trace, TraceError, TraceWriter, read_trace, write_trace
from moe_serve.simulate import Costs, load_costs, simulate, zipf_trace


@pytest.fixture(autouse=True)
def no_benchmark_results(tmp_path_factory, monkeypatch):
    """Predictions here use the costs each test names, not the cost table the package ships."""
    import moe_serve.simulate as sim
    monkeypatch.setattr(sim, "COSTS_FILE", tmp_path_factory.mktemp("no-table") / "costs.json")


def small_trace(steps=5, layers=2, experts=8, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(steps, layers, experts))
    return Trace(layers, experts, 2, counts, counts.sum(axis=(1, 2)) // (2 * layers), np.arange(steps) * 0.5,
                 {"source": "test"})


def test_trace_round_trip_through_a_msgpack_file(tmp_path):
    t = small_trace()
    path = write_trace(tmp_path / "t.msgpack", t)
    # it is a plain msgpack stream: a header map, then one map per step
    with path.open("rb") as f:
        records = list(msgpack.Unpacker(f, raw=False))
    assert records[0]["format"] == "moe-serve-trace" and records[0]["n_layers"] == 2 and len(records) == 6
    back = read_trace(path)
    assert (back.counts == t.counts).all() and (back.tokens == t.tokens).all() and np.allclose(back.t, t.t)
    assert (back.n_layers, back.n_experts, back.top_k, back.meta["source"]) == (2, 8, 2, "test")


def test_writer_streams_steps_and_rejects_a_wrong_shape(tmp_path):
    with (tmp_path / "t.msgpack").open("wb") as f:
        w = TraceWriter(f, 2, 8, 2)
        w.step(np.ones((2, 8)), 8, 1.0)
        with pytest.raises(ValueError, match="shape"):
            w.step(np.ones((3, 8)), 8, 2.0)
    assert read_trace(tmp_path / "t.msgpack").n_steps == 1


def test_replaying_a_recorded_trace_matches_its_skew(tmp_path):
    """A trace of the 2-layer test model replays for Mixtral shapes (tiled over the layers); an expert
    that takes most of the traffic gets most of the replicas."""
    counts = np.zeros((20, 2, 8), dtype=np.int64)
    counts[:, :, 3] = 600
    counts[:, :, [0, 1, 2, 4, 5, 6, 7]] = 60
    path = write_trace(tmp_path / "rec.msgpack", Trace(2, 8, 2, counts, np.full(20, 512), np.arange(20.0), {}))
    out = simulate(shape="mixtral-8x7b", gpus=40, trace=read_trace(path), costs=load_costs(transport="pinned"))
    assert out["load_share"]["expert-3"] == pytest.approx(600 / 1020)
    assert out["replicas"]["expert-3"] == max(out["replicas"].values())
    assert out["replicas"]["expert-3"] > out["replicas"]["expert-0"]
    assert out["assumptions"]["trace_layers"] == "2, tiled over 32"
    assert out["routers"] + sum(out["replicas"].values()) == out["gpus"] == 40


def test_zipf_skew_gives_hot_experts_more_replicas():
    cfg = preset("mixtral-8x7b")
    uniform = simulate(shape="mixtral-8x7b", gpus=48, zipf=0.0, costs=load_costs(transport="pinned"))
    skewed = simulate(shape="mixtral-8x7b", gpus=48, zipf=1.2, costs=load_costs(transport="pinned"))
    reps = [skewed["replicas"][f"expert-{e}"] for e in range(cfg.n_experts)]
    share = [skewed["load_share"][f"expert-{e}"] for e in range(cfg.n_experts)]
    # expert 0 is the hottest; replicas fall with the load, and even out when the load does
    assert share == sorted(share, reverse=True) and share[0] > 3 * share[-1]
    assert reps == sorted(reps, reverse=True) and reps[0] >= 3 * reps[-1]
    flat = list(uniform["replicas"].values())
    assert max(flat) - min(flat) <= 1


@pytest.mark.parametrize("shape", ["mixtral-8x7b", "mixtral-8x22b"])
@pytest.mark.parametrize("transport", ["grpc", "pinned"])
def test_more_gpus_never_predict_fewer_tokens_per_s(shape, transport):
    out = simulate(shape=shape, gpus=80, zipf=1.0, steps=50, costs=load_costs(transport=transport))
    tps = [c["tokens_per_s"] for c in out["curve"]]
    assert [c["gpus"] for c in out["curve"]] == list(range(9, 81))
    assert all(b >= a for a, b in zip(tps, tps[1:]))
    assert tps[-1] > 4 * tps[0]  # and they do help


def test_transport_and_shape_move_the_prediction_the_right_way():
    kw = dict(gpus=32, zipf=1.0, steps=50)
    grpc = simulate(shape="mixtral-8x7b", costs=load_costs(transport="grpc"), **kw)
    pinned = simulate(shape="mixtral-8x7b", costs=load_costs(transport="pinned"), **kw)
    big = simulate(shape="mixtral-8x22b", costs=load_costs(transport="pinned"), **kw)
    assert pinned["tokens_per_s"] > 10 * grpc["tokens_per_s"]
    assert "router wire" in grpc["bottleneck"]
    assert big["tokens_per_s"] < pinned["tokens_per_s"]
    # a router step moves T*k rows of hidden_size bf16 values each way at the stated bandwidth
    a = grpc["assumptions"]
    assert a["wire_ms_per_layer_at_router"] == pytest.approx(2 * 512 * 2 * 4096 * 2 / (0.15e9) * 1e3)


def test_target_reports_the_gpus_needed():
    out = simulate(shape="mixtral-8x7b", gpus=64, zipf=1.0, steps=50, target_tokens_per_s=2000,
                   costs=load_costs(transport="grpc"))
    need = out["gpus_needed"]
    curve = {c["gpus"]: c["tokens_per_s"] for c in out["curve"]}
    assert curve[need] >= 2000 > curve[need - 1]
    out = simulate(shape="mixtral-8x7b", gpus=16, zipf=1.0, steps=50, target_tokens_per_s=1e9)
    assert out["gpus_needed"] is None


def test_costs_from_a_benchmark_result(tmp_path):
    rows = [{"T": 64, "transport": "inprocess", "ms": 2.0, "MB_each_way": 0.5},
            {"T": 512, "transport": "inprocess", "ms": 4.0, "MB_each_way": 4.0},
            {"T": 64, "transport": "grpc", "ms": 2.0 + 30 + 2 * 0.5 / 0.2, "MB_each_way": 0.5},
            {"T": 512, "transport": "grpc", "ms": 4.0 + 30 + 2 * 4.0 / 0.2, "MB_each_way": 4.0},
            {"T": 512, "transport": "shm", "ms": 5.0, "MB_each_way": 4.0}]
    p = tmp_path / "moe_layer__gpu.json"
    p.write_text(json.dumps({"benchmark": "moe_layer__gpu", "preset": "bench", "device": "cuda",
                             "dtype": "bfloat16", "rows": rows}))
    c = load_costs(p)
    # the gRPC rows' extra time is 30 ms + 2 * MB / 0.2 GB/s: both parts come back out
    assert c.reference == "bench" and c.wire == "grpc measured"
    assert c.wire_gbs == pytest.approx(0.2) and c.wire_fixed_ms == pytest.approx(30.0)
    fixed, per_row = c.fit()
    assert per_row == pytest.approx(2.0 / (448 * 2)) and fixed > 0
    assert "moe_layer__gpu.json" in c.source
    # one shm row is too few for a line: the wire falls back to a figure, and says so
    assert load_costs(p, transport="pinned").wire == "pinned figure"
    with pytest.raises(ValueError, match="unknown transport 'shm'"):
        load_costs(p, transport="shm")
    assert load_costs("defaults").source == Costs().source


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"\xc1\xc1\xc1", "not a msgpack routing trace"),
    (b"plain text, not a trace", "not a routing trace"),
    (msgpack.packb({"format": "moe-serve-trace", "version": 9, "n_layers": 2, "n_experts": 8, "top_k": 2}),
     "version 9"),
    (msgpack.packb({"format": "moe-serve-trace", "version": 1, "n_layers": 2, "n_experts": 8}), "top_k"),
    (msgpack.packb({"format": "moe-serve-trace", "version": 1, "n_layers": 2, "n_experts": 8, "top_k": 2})
     + msgpack.packb({"counts": [[1] * 8] * 3}), "step 1 has no counts of shape [2, 8]"),
    (msgpack.packb({"format": "moe-serve-trace", "version": 1, "n_layers": 1, "n_experts": 2, "top_k": 1})
     + msgpack.packb({"counts": [[1, -4]]}), "negative"),
])
def test_bad_trace_files_get_a_clear_error(tmp_path, capsys, content, words):
    p = tmp_path / "bad.msgpack"
    p.write_bytes(content)
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert words in str(e.value)
    assert main(["simulate", "--trace", str(p), "--gpus", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-serve simulate: error:") and words in err and "Traceback" not in err


def test_truncated_and_missing_traces(tmp_path):
    path = write_trace(tmp_path / "t.msgpack", small_trace())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(TraceError, match="truncated"):
        read_trace(path)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "nope.msgpack")


def test_impossible_requests_are_refused():
    with pytest.raises(ValueError, match="at least|must lie"):
        simulate(shape="mixtral-8x7b", gpus=4, zipf=1.0)
    with pytest.raises(ValueError, match="top-2 of 4 experts"):
        simulate(shape="mixtral-8x7b", gpus=16, trace=small_trace(experts=4))
    with pytest.raises(ValueError, match="unknown shape"):
        simulate(shape="mixtral-8x9b", gpus=16, zipf=1.0)
    with pytest.raises(ValueError, match="unknown transport"):
        load_costs(transport="carrier-pigeon")


def test_replica_split_mirrors_the_replica_pool():
    """A hot expert's extra replicas share each of its calls, as ReplicaPool splits them, so they
    shorten a lone router's step; below SPLIT_MIN_ROWS rows per replica they do not."""
    import inspect

    from router_service.replica_pool import ReplicaPool
    from moe_serve.simulate import SPLIT_MIN_ROWS, Simulator

    assert inspect.signature(ReplicaPool).parameters["split_min_rows"].default == SPLIT_MIN_ROWS
    cfg = preset("mixtral-8x7b")
    counts = np.zeros((1, cfg.n_layers, 8), dtype=np.int64)
    counts[..., 0], counts[..., 1:] = 600, 60
    sim = Simulator(cfg, Trace(cfg.n_layers, 8, 2, counts, np.array([512]), np.array([1.0])),
                    load_costs(transport="pinned"), batch_tokens=512)
    one, _ = sim.expert_side(np.ones(8))
    four, busy = sim.expert_side(np.array([4, 1, 1, 1, 1, 1, 1, 1]))
    assert four[0] < one[0]  # expert 0 (about 600 rows a layer) splits into 4 calls
    many, _ = sim.expert_side(np.array([4, 4, 4, 4, 4, 4, 4, 4]))
    assert many[0] == pytest.approx(four[0])  # the others' 60 rows stay in one call each
    assert busy[0, 0] < sim.expert_side(np.ones(8))[1][0, 0]


def test_cli_prints_prediction_with_its_assumptions(tmp_path, capsys):
    path = write_trace(tmp_path / "t.msgpack", zipf_trace(preset("mixtral-8x22b"), s=1.0, steps=10))
    assert main(["simulate", "--trace", str(path), "--shape", "mixtral-8x22b", "--gpus", "24",
                 "--transport", "pinned", "--target", "10000"]) == 0
    text = capsys.readouterr().out
    for words in ("router replicas", "expert replicas", "tokens/s", "GPUs needed", "assumptions:",
                  "wire_gb_per_s_each_way: 25", "expert_ms_per_layer_measured"):
        assert words in text
    assert main(["simulate", "--zipf", "1.0", "--gpus", "12", "--json", "--costs", str(_costs_file(tmp_path))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["assumptions"]["costs_source"] == "mine" and out["assumptions"]["wire_gb_per_s_each_way"] == 1.0
    assert out["routers"] + sum(out["replicas"].values()) == 12


def _costs_file(tmp_path):
    p = tmp_path / "costs.json"
    p.write_text(json.dumps({"expert_ms": [[128, 1.0], [1024, 3.0]], "wire_gbs": 1.0, "source": "mine"}))
    return p


def test_bad_costs_files(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_costs(p)
    p.write_text(json.dumps({"expert_ms": [[512, 1.0]]}))
    with pytest.raises(ValueError, match="two or more"):
        load_costs(p)
    p.write_text(json.dumps({"gpu_count": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_costs(p)
    assert Costs().fit()[1] > 0


def test_the_cost_table_comes_from_the_gpu_benchmark_results_not_cpu_runs(tmp_path, monkeypatch):
    import moe_serve.simulate as sim
    from moe_serve.simulate import cost_table

    def result(name, preset_name, device, ms):
        rows = [{"T": 512, "transport": "inprocess", "ms": ms, "MB_each_way": 1.0},
                {"T": 4096, "transport": "inprocess", "ms": 4 * ms, "MB_each_way": 8.0}]
        (tmp_path / name).write_text(json.dumps({"benchmark": "moe_layer", "preset": preset_name, "device": device,
                                                 "machine": {"device": "NVIDIA H200", "date": "2026-11-29"},
                                                 "rows": rows}))

    result("a_cpu.json", "mixtral-8x7b", "cpu", 50.0)
    assert cost_table(tmp_path) is None
    result("b_small.json", "bench", "cuda", 0.5)
    result("c_big.json", "mixtral-8x7b", "cuda", 2.0)
    (tmp_path / "d_other.json").write_text(json.dumps({"benchmark": "something else"}))
    table = cost_table(tmp_path)
    assert "c_big.json" in table["source"] and "NVIDIA H200, 2026-11-29" in table["source"]
    table_file = tmp_path / "table" / "costs.json"
    table_file.parent.mkdir()
    table_file.write_text(json.dumps(table))
    monkeypatch.setattr(sim, "COSTS_FILE", table_file)  # as the package ships it
    picked = load_costs()
    assert picked.reference == "mixtral-8x7b" and picked.expert_ms == ((512, 2.0), (4096, 8.0))
    assert picked.wire == "grpc figure"  # it measured no wire: the figure stands
    out = simulate(shape="mixtral-8x7b", gpus=12, zipf=1.0, steps=20)
    assert "c_big.json" in out["assumptions"]["costs_source"]


def test_the_shipped_cost_table_is_the_one_the_results_give():
    import moe_serve
    from moe_serve.simulate import cost_table
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    shipped = Path(moe_serve.__file__).parent / "costs.json"
    assert json.loads(shipped.read_text()) == json.loads(json.dumps(cost_table(results))), \
        "moe_serve/costs.json is stale: run `python -m benchmarks.cost_table`"
