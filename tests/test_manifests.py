"""The cluster manifests: the KubeRay RayService carries cluster/serve.yaml verbatim, has a head and
a GPU worker group that Kubernetes accepts, and the `ray up` config passes Ray's own schema.

`python -m tests.test_manifests --write` copies cluster/serve.yaml into serveConfigV2 again.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SERVE = CLUSTER / "serve.yaml"
RAYSERVICE = CLUSTER / "kuberay-rayservice.yaml"
RAY_UP = CLUSTER / "ray-cluster.yaml"
K8S_VERSION = "1.30.0"


def rayservice_docs() -> list[dict]:
    return list(yaml.safe_load_all(RAYSERVICE.read_text()))


@pytest.fixture(scope="module")
def rayservice():
    docs = rayservice_docs()
    found = [d for d in docs if d.get("kind") == "RayService"]
    assert len(found) == 1
    return found[0]


def groups(rs) -> list[dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_serve_config_is_valid_for_ray_serve():
    cfg = yaml.safe_load(SERVE.read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.applications[0].import_path == "router_service.app:build_app"
    assert {d["name"] for d in cfg["applications"][0]["deployments"]} == {"Gateway", "Router"}
    assert "autoscaling_config" in cfg["applications"][0]["args"]["expert_options"]  # experts: from the checkpoint


def test_serve_config_v2_is_serve_yaml(rayservice):
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a string holding YAML"
    assert yaml.safe_load(text) == yaml.safe_load(SERVE.read_text()), \
        "serveConfigV2 differs from cluster/serve.yaml: run `python -m tests.test_manifests --write`"
    ServeDeploySchema.model_validate(yaml.safe_load(text))


def test_rayservice_has_the_fields_kuberay_requires(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the Ray this project is tested with
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"] and workers
    names = [w["groupName"] for w in workers]
    assert len(set(names)) == len(names)
    for w in workers:
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    for g in groups(rayservice):
        # KubeRay passes rayStartParams to `ray start` as strings: a number here is rejected
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        if "resources" in g["rayStartParams"]:
            custom = json.loads(json.loads(g["rayStartParams"]["resources"]))  # '"{...}"' as KubeRay wants
            assert all(isinstance(v, (int, float)) and v > 0 for v in custom.values())


def test_there_is_a_gpu_worker_group(rayservice):
    gpu = [w for w in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for c in w["template"]["spec"]["containers"])]
    assert gpu, "no worker group asks for nvidia.com/gpu"
    (container,) = gpu[0]["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    # Kubernetes refuses an extended resource whose request differs from its limit
    assert container["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
    custom = json.loads(json.loads(gpu[0]["rayStartParams"]["resources"]))
    assert custom == {"expert_node": int(limits["nvidia.com/gpu"])}


def test_head_exposes_the_gateway_port(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    ports = {p["containerPort"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    grpc_port = yaml.safe_load(SERVE.read_text())["grpc_options"]["port"]
    assert {6379, 8265, grpc_port} <= ports
    services = [d for d in rayservice_docs() if d.get("kind") == "Service"]
    assert any(p["targetPort"] == grpc_port for s in services for p in s["spec"]["ports"])
    # the Service selects the head pod by the labels its template carries
    for s in services:
        assert s["spec"]["selector"].items() <= head["metadata"]["labels"].items()


def test_pod_templates_pass_the_kubernetes_schema(rayservice):
    """kubernetes-validate has the Kubernetes API's own schemas (strict: unknown fields fail). It has
    no RayService schema (KubeRay's CRD is not on any package registry), so each group's pod
    template is checked as the core PodTemplate it becomes, and the extra Service as itself."""
    for g in groups(rayservice):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": g.get("groupName", "head")},
               "template": g["template"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for d in rayservice_docs():
        if d.get("kind") != "RayService":
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_kubernetes_check_catches_a_bad_template(rayservice):
    bad = copy.deepcopy(groups(rayservice)[-1]["template"])
    bad["spec"]["containers"][0]["resource"] = bad["spec"]["containers"][0].pop("resources")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": bad}, K8S_VERSION, strict=True)


def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(RAY_UP.read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any("expert_node" in t.get("resources", {}) for t in types.values())
    images = cfg["docker"]
    assert images["head_image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert images["worker_image"].startswith(f"rayproject/ray:{ray.__version__}") and "gpu" in images["worker_image"]
    assert any("pip install" in c and "moe-serve" in c for c in cfg["setup_commands"])
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(bad))


def write_serve_config_v2() -> None:
    """Replaces the serveConfigV2 block of the RayService with cluster/serve.yaml, indented."""
    lines = RAYSERVICE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "serveConfigV2: |")
    indent = " " * (len(lines[start]) - len(lines[start].lstrip()) + 2)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith(indent))
    body = [indent + line if line.strip() else "" for line in SERVE.read_text().splitlines()]
    RAYSERVICE.write_text("\n".join(lines[:start + 1] + body + lines[end:]) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_serve_config_v2()
        print(f"copied {SERVE} into {RAYSERVICE}")


def test_gpu_placement_of_the_serve_config(tiny_model):
    from moe_serve.launcher import load_config, place_on_gpus
    cfg = place_on_gpus(load_config(SERVE, model=str(tiny_model)), router_gpus=1, expert_gpus=0.125,
                        dtype="bfloat16")
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    gpus = {d["name"]: (d.get("ray_actor_options") or {}).get("num_gpus", 0) for d in app["deployments"]}
    assert gpus == {"Gateway": 0, "Router": 1, **{f"expert-{e}": 0.125 for e in range(8)}}
    assert app["args"]["expert_dtype"] == app["args"]["router_dtype"] == "bfloat16"
    untouched = yaml.safe_load(SERVE.read_text())
    assert place_on_gpus(yaml.safe_load(SERVE.read_text())) == untouched
