import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.checkpoint import Checkpoint, CheckpointError, dense_shapes, expert_keys, random_weights, write_checkpoint
from moe_core.config import preset


def _write(d, **kw):
    cfg = preset("tiny")
    write_checkpoint(d, cfg, random_weights(cfg, seed=1), **kw)
    return cfg


def test_sharded_equals_single(tmp_path):
    _write(tmp_path / "one")
    _write(tmp_path / "many", shard_size=64 * 1024)
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 1
    a, b = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "many")
    keys = dense_shapes(a.config)
    ta, tb = a.load(keys), b.load(keys)
    assert all(torch.equal(ta[k], tb[k]) for k in keys)


def test_expert_load_reads_only_its_tensors(tmp_path):
    _write(tmp_path, shard_size=64 * 1024)
    from expert_service.experts import ExpertShard
    ckpt = Checkpoint(tmp_path)
    shard = ExpertShard.load(ckpt, [(0, 3), (1, 3)])
    assert shard.pairs == [(0, 3), (1, 3)]
    assert sum(t.numel() for w in shard.weights.values() for t in w) == 2 * 3 * 64 * 128


def test_fp16_and_bf16_on_disk(tmp_path):
    for dt in (torch.float16, torch.bfloat16):
        _write(tmp_path / str(dt), dtype=dt)
        t = Checkpoint(tmp_path / str(dt)).load({"model.norm.weight": (64,)})
        assert t["model.norm.weight"].dtype == torch.float32


def test_missing_key_named(tmp_path):
    _write(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors[expert_keys(1, 5)[1]]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w2\.weight"):
        from router_service.engine import local_engine
        local_engine(tmp_path)


def test_wrong_shape_named(tmp_path):
    _write(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \[3, 3\]"):
        Checkpoint(tmp_path).check(dense_shapes(preset("tiny")))


def test_wrong_model_type(tmp_path):
    _write(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type must be 'mixtral'"):
        Checkpoint(tmp_path)


def test_truncated_file(tmp_path):
    _write(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)


def test_missing_shard_named(tmp_path):
    _write(tmp_path, shard_size=64 * 1024)
    (tmp_path / "model-00002-of-{:05d}.safetensors".format(len(list(tmp_path.glob("*.safetensors"))))).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        Checkpoint(tmp_path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_serve.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_init_generate_score(tmp_path):
    d = tmp_path / "m"
    assert _cli("init-model", str(d), "--seed", "3", "--shard-size", "100KB").returncode == 0
    assert (d / "model.safetensors.index.json").exists() and (d / "tokenizer.json").exists()
    r = _cli("generate", "--model", str(d), "--local", "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    r = _cli("score", "--model", str(d), "--local", "--token-ids", "1,2,3,4", "--out", str(tmp_path / "l.npy"))
    assert r.returncode == 0
    logits = np.load(tmp_path / "l.npy")
    assert logits.shape == (4, 512) and logits.dtype == np.float32


@pytest.mark.parametrize("args,msg", [
    (["--prompt-ids", "1,2,999"], "out of range"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt-ids", "1,x"], "comma-separated"),
])
def test_cli_bad_arguments_one_line(tiny_model, args, msg):
    r = _cli("generate", "--model", str(tiny_model), "--local", *args)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_model_dir(tmp_path):
    r = _cli("score", "--model", str(tmp_path / "nope"), "--local", "--token-ids", "1", "--out", str(tmp_path / "l.npy"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
