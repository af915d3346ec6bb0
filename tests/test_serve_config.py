"""The Serve config against the checkpoint: an expert deployment per shard the checkpoint has,
options from `args.expert_options` with the config's own entries on top, and configs that name
deployments the checkpoint lacks (or miss ones it needs) refused before anything is deployed."""
from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from moe_serve.launcher import DEFAULT_CONFIG, load_config


def checkpoint(tmp_path, n_experts, n_layers=2):
    cfg = preset("tiny").replace(n_experts=n_experts, n_layers=n_layers, top_k=min(2, n_experts))
    write_checkpoint(tmp_path, cfg, random_weights(cfg, seed=0))
    return tmp_path


def names(cfg):
    return [d["name"] for d in cfg["applications"][0]["deployments"]]


@pytest.mark.parametrize("n_experts", [2, 4, 6, 8])
def test_one_expert_deployment_per_expert_of_the_checkpoint(tmp_path, n_experts):
    cfg = load_config(model=str(checkpoint(tmp_path, n_experts)))
    assert names(cfg) == ["Gateway", "Router", *(f"expert-{e}" for e in range(n_experts))]
    experts = cfg["applications"][0]["deployments"][2:]
    assert all(d["autoscaling_config"]["policy"]["policy_kwargs"]["metric"] == "rows_per_s" for d in experts)
    assert "expert_options" not in cfg["applications"][0]["args"]
    ServeDeploySchema.model_validate({k: v for k, v in cfg.items() if k != "grpc_options"})


def test_layers_per_shard_names_a_deployment_per_layer_range(tmp_path):
    cfg = load_config(model=str(checkpoint(tmp_path, 2, n_layers=4)), layers_per_shard=2)
    assert names(cfg)[2:] == ["expert-0-layers-0-1", "expert-0-layers-2-3", "expert-1-layers-0-1", "expert-1-layers-2-3"]


def edited(tmp_path, edit):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    edit(raw["applications"][0])
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_experts_own_entry_goes_on_top_of_the_default(tmp_path):
    model = checkpoint(tmp_path / "m", 4)
    path = edited(tmp_path, lambda app: app["deployments"].extend([
        {"name": "expert-3", "autoscaling_config": {"max_replicas": 8}},
        {"name": "expert-1", "num_replicas": 2}]))
    deployments = {d["name"]: d for d in load_config(path, model=str(model))["applications"][0]["deployments"]}
    assert deployments["expert-3"]["autoscaling_config"]["max_replicas"] == 8
    assert deployments["expert-3"]["autoscaling_config"]["policy"]  # the default's policy kept
    assert deployments["expert-1"]["num_replicas"] == 2 and "autoscaling_config" not in deployments["expert-1"]
    assert deployments["expert-0"]["autoscaling_config"]["max_replicas"] == 3


def test_a_deployment_the_checkpoint_lacks_is_refused_naming_both(tmp_path):
    model = checkpoint(tmp_path / "m", 4)
    path = edited(tmp_path, lambda app: app["deployments"].append({"name": "expert-4", "num_replicas": 1}))
    with pytest.raises(ValueError, match=r"configures deployment expert-4, which checkpoint .* \(4 experts, 2 layers\) "
                                         r"does not have; its expert deployments are expert-0 .. expert-3"):
        load_config(path, model=str(model))


def test_a_config_without_defaults_that_misses_an_expert_is_refused(tmp_path):
    model = checkpoint(tmp_path / "m", 4)

    def edit(app):
        del app["args"]["expert_options"]
        app["deployments"] += [{"name": f"expert-{e}", "num_replicas": 1} for e in range(3)]
    with pytest.raises(ValueError, match="not expert-3, which checkpoint .* needs"):
        load_config(edited(tmp_path, edit), model=str(model))


def test_an_unknown_or_bad_arg_is_refused_naming_it_and_the_file(tmp_path):
    model = checkpoint(tmp_path / "m", 2)
    path = edited(tmp_path, lambda app: app["args"].update(max_runing=8))
    with pytest.raises(ValueError, match=rf"{path}: unknown key max_runing in args \(known: .*max_running"):
        load_config(path, model=str(model))
    path = edited(tmp_path, lambda app: app["args"].update(transport="tcp"))
    with pytest.raises(ValueError, match=rf"{path}: transport must be one of 'grpc', 'handle', got 'tcp'"):
        load_config(path, model=str(model))


def test_the_serving_config_parses_the_flat_args_into_sections_with_one_set_of_defaults():
    import inspect

    from router_service.engine import Engine
    from router_service.serving import RouterConfig, ServingConfig
    cfg = ServingConfig.from_args({"model": "m", "max_running": 8, "expert_dtype": "bfloat16", "router_wait_s": 3.0,
                                   "expert_tls": {"ca": "ca.pem"}})
    assert (cfg.router.max_running, cfg.router.max_queued, cfg.expert.expert_dtype) == (8, 256, "bfloat16")
    assert cfg.gateway.given() == {"router_wait_s": 3.0} and cfg.expert_tls == {"ca": "ca.pem"}
    engine = inspect.signature(Engine).parameters
    for name in ("max_running", "max_queued", "max_step_tokens", "micro_batches", "cuda_graphs"):
        assert engine[name].default == getattr(RouterConfig, name)  # the engine's defaults are the config's
    with pytest.raises(ValueError, match="args.model .* is missing"):
        ServingConfig.from_args({})
    with pytest.raises(ValueError, match="max_running must be an integer >= 1, got 0"):
        ServingConfig.from_args({"model": "m", "max_running": 0})
    assert ServingConfig.from_args({"model": "m", "max_queued": 0}).router.max_queued == 0  # no queue: refuse at once
