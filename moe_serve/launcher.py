"""Bringing the application up and down: a local Ray cluster (or RAY_ADDRESS), Serve with the
gRPC gateway and the OpenAI HTTP routes, the app from the Serve config (the package's `serve.yaml` unless given another),
and a wait until the gateway answers for the model just deployed.

Progress goes to stderr, one line a stage; Ray's own log lines only with `verbose`. A failed `up`
ends with Serve's reason in one line (`DeployError`) and stops what it started.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from importlib import resources
from pathlib import Path

import grpc
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from expert_service.directory import NAMESPACE, kill_directory
from moe_core.config import MoEConfig
from moe_serve import client
from router_service import security, validation
from router_service.app import expert_deployments
from router_service.gateway import (GENERATED_SERVICER_FUNCTIONS, MAX_MESSAGE_ENV, SERVICER_FUNCTIONS,
                                    proxy_message_limit)
from router_service.serving import ServingConfig

DEFAULT_CONFIG = Path(str(resources.files("router_service") / "serve.yaml"))
STATE_FILE = Path(os.environ.get("MOE_SERVE_STATE", Path.home() / ".cache" / "moe-serve" / "state.json"))
APP = "moe"
DASHBOARD_PORT = 8265


class DeployError(RuntimeError):
    """The deploy failed or never became healthy; the message is one line naming Serve's reason."""


def load_config(path: str | Path | None = None, *, model: str | None = None, port: int | None = None,
                http_port: int | None = None, reflection: bool | None = None, **app_args) -> dict:
    """The Serve config from YAML, with the model made absolute, the gRPC and HTTP ports set and an entry in
    `deployments:` for every expert deployment the checkpoint has (app.expert_deployments).
    `reflection` False turns gRPC server reflection off at the gateway (Serve has it on)."""
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
    ServingConfig.from_args(app["args"], source=str(path))  # refuses an unknown key or value, naming the file
    app["deployments"] = expert_deployments(app, MoEConfig.from_dir(app["args"]["model"]), source=str(path))
    app["args"].pop("expert_options", None)  # written out per deployment above, where Serve can update it
    grpc_options = cfg.setdefault("grpc_options", {})
    listed = set(grpc_options.get("grpc_servicer_functions", [])) - set(GENERATED_SERVICER_FUNCTIONS)
    grpc_options["grpc_servicer_functions"] = sorted(listed | set(SERVICER_FUNCTIONS))
    if port is not None:
        grpc_options["port"] = port
    grpc_options.setdefault("port", 9000)
    if reflection is not None:
        grpc_options["enable_reflection"] = reflection
    http_options = cfg.setdefault("http_options", {})
    if http_port is not None:
        http_options["port"] = http_port
    http_options.setdefault("port", 8000)
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


def deploy(cfg: dict, *, wait_s: float = 300.0, progress=None) -> str:
    """Deploys into the Ray cluster this process is connected to and returns the gateway address
    once the gateway answers for this deployment (its Stats carry the deploy id given here).

    Where this starts Serve, its proxy's message limit is set to what the gateway takes
    (gateway.proxy_message_limit) through the controller's environment, which the proxies inherit;
    the config's own `controller_options` env_vars go first."""
    app = cfg["applications"][0]
    app["args"]["deploy_id"] = uuid.uuid4().hex[:12]
    limit = proxy_message_limit(app["args"].get("max_request_bytes", validation.MAX_REQUEST_BYTES))
    env = dict(((cfg.get("controller_options") or {}).get("runtime_env") or {}).get("env_vars") or {})
    env.setdefault(MAX_MESSAGE_ENV, str(limit))
    serve.start(http_options=cfg.get("http_options"), grpc_options=cfg["grpc_options"],
                proxy_location=cfg.get("proxy_location", "HeadOnly"),
                controller_options={"runtime_env": {"env_vars": env}})
    serve_cfg = {k: v for k, v in cfg.items()
                 if k not in ("http_options", "grpc_options", "proxy_location", "controller_options")}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(serve_cfg))
    address = f"127.0.0.1:{cfg['grpc_options']['port']}"
    wait_serving(address, app, wait_s, progress or (lambda line: None))
    return address


def wait_serving(address: str, app: dict, wait_s: float, progress) -> None:
    """Until the gateway at `address` answers Stats with `app`'s deploy id (a gateway of an earlier
    deployment still answering health checks does not count); DeployError when Serve gives up
    on the deploy or `wait_s` passes."""
    deadline, name, said = time.monotonic() + wait_s, app.get("name", APP), None
    token = _token(app["args"])
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":  # it does not heal itself: say so now
            raise DeployError(f"deploy failed: {serve_reason(status)}")
        if status is not None and status.deployments:
            running = sum(d.status == "HEALTHY" for d in status.deployments.values())
            line = f"deployments {running}/{len(status.deployments)} running"
            if line != said:
                progress(line)
                said = line
        if _answers(address, name, app["args"]["deploy_id"], token):
            progress(f"healthy: the gateway at {address} serves {Path(app['args']['model']).name}")
            return
        if time.monotonic() > deadline:
            why = serve_reason(status) if status is not None else "the application never appeared"
            raise DeployError(f"not serving after {wait_s:.0f} s: {why}")
        time.sleep(0.5)


def _answers(address: str, app: str, deploy_id: str, token: str | None) -> bool:
    """Whether the gateway's Stats name this deployment; where the plaintext port refuses Stats
    (TLS required, no token here), its health check and the router's own stats through Serve."""
    try:
        return client.stats(address, timeout=5, ca="", token=token or "").deploy_id == deploy_id
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return False
    if not client.healthy(address, ca="", token=""):  # health needs no token
        return False
    try:
        router = serve.get_deployment_handle("Router", app_name=app)
        return router.stats.remote().result(timeout_s=10)["deploy_id"] == deploy_id
    except Exception:
        return False


def _token(args: dict) -> str | None:
    """A bearer token the gateway of this config accepts (Stats needs one where tokens are set)."""
    if os.environ.get(security.TOKEN_ENV):
        return os.environ[security.TOKEN_ENV]
    path = args.get("auth_token_file")
    if path and Path(path).is_file():
        return next((t.strip() for t in Path(path).read_text().splitlines() if t.strip()), None)
    return None


def serve_reason(status) -> str:
    """Serve's reason for an application's state, one line: the exception's last line of the first
    deployment (or the application) that has a message, not its traceback."""
    messages = [f"{n}: {d.message}" for n, d in status.deployments.items() if d.message and d.status != "HEALTHY"]
    text = messages[0] if messages else (status.message or str(status.status))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln)]
    head = lines[0].split(":")[0] + ": " if messages else ""
    return (head + errors[-1]) if errors else " ".join(lines)[:500]


def up(*, model: str | None, port: int = 9000, http_port: int = 8000, config: str | None = None, num_cpus: int | None = None,
       num_gpus: int | None = None, wait_s: float = 300.0, router_gpus: float = 0, expert_gpus: float = 0,
       dtype: str | None = None, dashboard: bool = True, reflection: bool = True, verbose: bool = False,
       progress=None) -> dict:
    """Starts a local Ray cluster unless RAY_ADDRESS names one or one runs here, and deploys; a
    running app is replaced (on the same port) and `up` returns once the new one answers. On a
    failure, what this call started is stopped again."""
    progress = progress or (lambda line: None)
    cfg = place_on_gpus(load_config(config, model=model, port=port, http_port=http_port,
                                    reflection=None if reflection else False),
                        router_gpus=router_gpus, expert_gpus=expert_gpus, dtype=dtype)
    state = _read_state()
    started = False
    if not os.environ.get("RAY_ADDRESS") and not _local_cluster_running():
        progress("starting a local Ray cluster" + (f" (dashboard at http://127.0.0.1:{DASHBOARD_PORT})"
                                                  if dashboard else ""))
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--disable-usage-stats",
               f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={DASHBOARD_PORT}"]
        cmd += [f"--num-cpus={num_cpus}"] if num_cpus else []
        cmd += [f"--num-gpus={num_gpus}"] if num_gpus is not None else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DeployError("ray start failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
        started = True
        state = {"started_ray": True}
        _write_state(state)  # `down` stops it even if this process dies before the end
    else:
        progress(f"joining the Ray cluster at {os.environ.get('RAY_ADDRESS') or 'this machine'}")
    _connect(verbose)
    running = False
    try:
        with _quiet(not verbose):
            running = APP in serve.status().applications if _serve_running() else False
            if running and state.get("port") not in (None, port):
                raise DeployError(f"moe-serve is running {state.get('model', '?')} on port {state['port']}; "
                                  f"`moe-serve down` first to serve on port {port}, or `up` on port {state['port']}")
            if running and state.get("http_port") not in (None, http_port):
                raise DeployError(f"moe-serve is running {state.get('model', '?')} on HTTP port {state['http_port']}; "
                                  f"`moe-serve down` first to serve on HTTP port {http_port}, or `up` on "
                                  f"--http-port {state['http_port']}")
            new = Path(cfg["applications"][0]["args"]["model"]).name
            progress(f"replacing {Path(state.get('model', '?')).name} with {new}" if running else f"deploying {new}")
            address = deploy(cfg, wait_s=wait_s, progress=progress)
    except BaseException:  # take down what this call started
        if started or not running:
            with _quiet(not verbose):
                _remove_app()
        ray.shutdown()
        if started:
            progress("stopping the Ray cluster this `up` started")
            _ray_stop()
            STATE_FILE.unlink(missing_ok=True)
        raise
    ray.shutdown()
    model_dir = cfg["applications"][0]["args"]["model"]
    _write_state(state | {"port": port, "http_port": http_port, "model": model_dir})
    host = cfg["http_options"].get("host", "127.0.0.1")
    return {"address": address, "http": f"http://{host}:{http_port}/v1", "model": model_dir,
            "started_ray": state.get("started_ray", False)}


def down(*, verbose: bool = False, progress=None) -> dict:
    progress = progress or (lambda line: None)
    state = _read_state()
    removed = False
    if os.environ.get("RAY_ADDRESS") or state.get("started_ray") or _local_cluster_running():
        _connect(verbose)
        progress("removing the application")
        with _quiet(not verbose):
            _remove_app()
        ray.shutdown()
        removed = True
    stopped = False
    if state.get("started_ray"):
        progress("stopping the local Ray cluster")
        _ray_stop()
        stopped = True
    STATE_FILE.unlink(missing_ok=True)
    return {"removed_app": removed, "stopped_ray": stopped}


def _connect(verbose: bool) -> None:
    with _quiet(not verbose):
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)


def _remove_app() -> None:
    """The application (and Serve with it) and the expert directory, whatever state they are in."""
    with contextlib.suppress(Exception):
        serve.shutdown()
    with contextlib.suppress(Exception):
        kill_directory()


def _ray_stop() -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], capture_output=True)


def _serve_running() -> bool:
    try:
        serve.context._get_global_client(raise_if_no_controller_running=True)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _quiet(on: bool):
    """Ray's and Serve's INFO/WARNING lines off (the CLI prints its own progress)."""
    if not on:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("ray", "ray.serve", "ray._private.worker")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _read_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(state: dict) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state))


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
