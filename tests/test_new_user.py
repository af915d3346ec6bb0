"""What a new user does: serve checkpoints that transformers wrote with any expert count through the
gateway, and run the CLI from a non-editable install outside the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_serve import client
from moe_serve.launcher import deploy, load_config
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import free_port, running_app
from tests.conftest import hf_checkpoint

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(2, 1), (4, 2), (6, 3), (8, 2)]  # (experts, top-k)


def test_checkpoints_of_2_to_8_experts_serve_equal_to_transformers(tmp_path):
    """One cluster; each checkpoint deployed over the one before (as `moe-serve up` replaces it)."""
    models = {shape: (tmp_path / f"e{shape[0]}k{shape[1]}", hf_checkpoint(
        tmp_path / f"e{shape[0]}k{shape[1]}", seed=shape[0], num_local_experts=shape[0],
        num_experts_per_tok=shape[1])) for shape in SHAPES}
    ids = [1, 17, 4, 99, 3, 3, 100, 0, 42]
    first_dir = models[SHAPES[0]][0]
    with running_app(first_dir, shared_memory="shm") as (address, cfg):
        port = cfg["grpc_options"]["port"]
        for (n_experts, top_k), (directory, hf) in models.items():
            if directory != first_dir:
                address = deploy(load_config(model=str(directory), port=port, shared_memory="shm"))
            s = client.stats(address)
            assert s.model == directory.name and s.top_k == top_k
            assert [d.name for d in s.deployments] == [f"expert-{e}" for e in range(n_experts)]
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0].numpy()
                greedy = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
            assert np.abs(client.score(address, ids) - ref).max() <= 1e-4, (n_experts, top_k)
            got = client.generate(address, prompt_ids=ids, params=SamplingParams(max_new_tokens=8))
            assert got["token_ids"] == greedy, (n_experts, top_k)


def _cli(venv: Path, *args, env, cwd, timeout=400):
    done = subprocess.run([str(venv / "bin" / "moe-serve"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done


def test_a_non_editable_install_outside_the_repository_runs_every_step(tmp_path):
    """pip install of a copy of the repository (not editable) into a fresh venv whose only other
    packages are this environment's dependencies; then the CLI from a directory outside the clone."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, ray, ...; not this project
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--disable-pip-version-check", str(REPO)], check=True, timeout=400)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import router_service; print(router_service.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert str(site) in where and str(REPO) not in where

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["MOE_SERVE_STATE"] = str(tmp_path / "state.json")
    port = free_port()
    _cli(venv, "init-model", "m", "--seed", "1", env=env, cwd=work)
    up = _cli(venv, "up", "--model", "m", "--port", str(port), "--num-cpus", "8", "--no-dashboard", env=env, cwd=work)
    try:
        assert f"healthy: the gateway at 127.0.0.1:{port} serves m" in up.stderr
        assert "INFO" not in up.stderr, up.stderr  # Ray's own lines only with --verbose
        out = json.loads(_cli(venv, "generate", "--address", f"127.0.0.1:{port}", "--prompt-ids", "1,2,3",
                              "--max-new-tokens", "4", env=env, cwd=work).stdout)
        assert len(out["token_ids"]) == 4
        sim = _cli(venv, "simulate", "--shape", "mixtral-8x7b", "--gpus", "16", "--zipf", "1.0", "--json",
                   env=env, cwd=work)
        here = subprocess.run([sys.executable, "-m", "moe_serve.cli", "simulate", "--shape", "mixtral-8x7b",
                               "--gpus", "16", "--zipf", "1.0", "--json"], capture_output=True, text=True,
                              cwd=REPO, check=True)
        installed, in_repo = json.loads(sim.stdout), json.loads(here.stdout)
        assert "moe_layer" in installed["assumptions"]["costs_source"]  # the shipped GPU cost table
        assert installed["tokens_per_s"] == in_repo["tokens_per_s"]
    finally:
        down = _cli(venv, "down", env=env, cwd=work)
    assert json.loads(down.stdout) == {"removed_app": True, "stopped_ray": True}
