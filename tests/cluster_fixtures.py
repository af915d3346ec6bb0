"""A real Ray cluster with the app deployed, shared by the cluster tests of one module."""
from __future__ import annotations

import contextlib
import socket

import ray
from ray import serve

from expert_service.directory import NAMESPACE, kill_directory
from moe_serve.launcher import deploy, load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(model_dir, *, num_cpus=16, num_gpus=0, config=None, edit=None, **app_args):
    """ray.init (logical CPUs: replicas reserve none, but Serve's own actors want some), deploy, yield
    the gateway address; shut everything down afterwards, whatever happened."""
    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=False)
            break
        except Exception as e:
            # On a loaded two-core machine Ray's metrics agent can take longer to start than the
            # raylet waits for it (about 15 s, not configurable); the raylet then aborts. Try again.
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    try:
        cfg = load_config(config, model=str(model_dir), port=free_port(), **app_args)
        if edit is not None:
            cfg = edit(cfg)
        yield deploy(cfg, wait_s=300), cfg
    finally:
        stop_app()


def stop_app() -> None:
    """Removes the app and the directory and disconnects, whatever state they are in."""
    with contextlib.suppress(Exception):
        serve.shutdown()
    with contextlib.suppress(Exception):
        kill_directory()
    ray.shutdown()
