"""Bringing the application up and down: a local Ray cluster (or RAY_ADDRESS), Serve with the
gRPC gateway, the app from `cluster/serve.yaml`, and a wait for the gateway's health check."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from expert_service.directory import NAMESPACE, kill_directory
from router_service import client
from router_service.gateway import GENERATED_SERVICER_FUNCTIONS, SERVICER_FUNCTIONS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve.yaml"
STATE_FILE = Path(os.environ.get("MOE_SERVE_STATE", Path.home() / ".cache" / "moe-serve" / "state.json"))


def load_config(path: str | Path | None = None, *, model: str | None = None, port: int | None = None,
                **app_args) -> dict:
    """The Serve config from YAML, with the model made absolute and the gRPC port set."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"Serve config {path} not found")
    cfg = yaml.safe_load(path.read_text())
    app = cfg["applications"][0]
    if model is not None:
        app["args"]["model"] = model
    app["args"]["model"] = str(Path(app["args"]["model"]).resolve())
    app["args"] |= {k: v for k, v in app_args.items() if v is not None}
    if not (Path(app["args"]["model"]) / "config.json").is_file():
        raise FileNotFoundError(f"model directory {app['args']['model']} has no config.json")
    grpc = cfg.setdefault("grpc_options", {})
    listed = set(grpc.get("grpc_servicer_functions", [])) - set(GENERATED_SERVICER_FUNCTIONS)
    grpc["grpc_servicer_functions"] = sorted(listed | set(SERVICER_FUNCTIONS))
    if port is not None:
        grpc["port"] = port
    grpc.setdefault("port", 9000)
    return cfg


def place_on_gpus(cfg: dict, *, router_gpus: float = 0, expert_gpus: float = 0, dtype: str | None = None) -> dict:
    """GPU shares in the config: `router_gpus` of a GPU for the router (its engine then runs there),
    `expert_gpus` for each expert replica (0.125: eight to a GPU; 1: a GPU each), and the dtype of
    both (bfloat16 on GPUs). A share of 0 leaves that deployment as the config has it."""
    app = cfg["applications"][0]
    for d in app.get("deployments", []):
        share = router_gpus if d["name"] == "Router" else expert_gpus if d["name"].startswith("expert-") else 0
        if share:
            d["ray_actor_options"] = dict(d.get("ray_actor_options") or {}, num_gpus=share)
    if dtype:
        app["args"] |= {"expert_dtype": dtype, "router_dtype": dtype}
    return cfg


def deploy(cfg: dict, *, wait_s: float = 300.0) -> str:
    """Deploys into the Ray cluster this process is connected to; returns the gateway address."""
    serve.start(http_options=cfg.get("http_options"), grpc_options=cfg["grpc_options"],
                proxy_location=cfg.get("proxy_location", "HeadOnly"))
    serve_cfg = {k: v for k, v in cfg.items() if k not in ("http_options", "grpc_options", "proxy_location")}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(serve_cfg))
    address = f"127.0.0.1:{cfg['grpc_options']['port']}"
    wait_healthy(address, wait_s)
    return address


def wait_healthy(address: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not client.healthy(address, ca="", token=""):  # the plaintext port; health needs no token
        status = serve.status().applications
        failed = any(a.status == "DEPLOY_FAILED" for a in status.values())
        if failed or time.monotonic() > deadline:  # a failed deploy does not heal itself: say so now
            why = "deploy failed" if failed else f"not healthy after {wait_s:.0f}s"
            raise TimeoutError(f"gateway at {address}: {why}; Serve says: "
                               + "; ".join(f"{n}: {a.status} {a.message}" for n, a in status.items()))
        time.sleep(0.5)


def up(*, model: str | None, port: int = 9000, config: str | None = None, num_cpus: int | None = None,
       num_gpus: int | None = None, wait_s: float = 300.0, router_gpus: float = 0, expert_gpus: float = 0,
       dtype: str | None = None) -> dict:
    cfg = place_on_gpus(load_config(config, model=model, port=port), router_gpus=router_gpus,
                        expert_gpus=expert_gpus, dtype=dtype)
    started = False
    if not os.environ.get("RAY_ADDRESS") and not _local_cluster_running():
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--disable-usage-stats",
               "--include-dashboard=false"]
        cmd += [f"--num-cpus={num_cpus}"] if num_cpus else []
        cmd += [f"--num-gpus={num_gpus}"] if num_gpus is not None else []
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        started = True
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    if started or not STATE_FILE.exists():
        STATE_FILE.write_text(json.dumps({"started_ray": started}))
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=False)
    try:
        address = deploy(cfg, wait_s=wait_s)
    finally:
        ray.shutdown()
    return {"address": address, "model": cfg["applications"][0]["args"]["model"], "started_ray": started}


def down() -> dict:
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    removed = False
    if os.environ.get("RAY_ADDRESS") or state.get("started_ray") or _local_cluster_running():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=False)
        serve.shutdown()
        kill_directory()
        ray.shutdown()
        removed = True
    stopped = False
    if state.get("started_ray"):
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], capture_output=True)
        stopped = True
    STATE_FILE.unlink(missing_ok=True)
    return {"removed_app": removed, "stopped_ray": stopped}


def _local_cluster_running() -> bool:
    """Whether `ray start` left a cluster on this machine whose GCS still answers."""
    path = Path("/tmp/ray/ray_current_cluster")
    if not path.exists():
        return False
    host, _, port = path.read_text().strip().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return True
    except (OSError, ValueError):
        return False
