import json

import pytest

from moe_core.config import ConfigError, MoEConfig, preset


def test_presets():
    tiny, bench = preset("tiny"), preset("bench")
    assert tiny.n_experts == 8 and tiny.top_k == 2 and tiny.n_layers == 2 and tiny.n_kv_heads < tiny.n_heads
    assert (bench.vocab_size, bench.hidden_size, bench.intermediate_size, bench.n_layers) == (32000, 512, 1792, 8)
    assert (bench.n_heads, bench.n_kv_heads, bench.n_experts, bench.top_k, bench.rope_theta) == (8, 2, 8, 2, 1e6)


@pytest.mark.parametrize("change,field", [
    ({"top_k": 9}, "top_k"),
    ({"n_heads": 5}, "n_heads"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"eos_token_id": 10_000}, "eos_token_id"),
])
def test_invalid_config_names_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny").replace(**change)


def test_hf_round_trip_and_model_type(tmp_path):
    cfg = preset("bench")
    assert MoEConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(head_dim=cfg.dim_per_head)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict() | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        MoEConfig.from_dir(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
