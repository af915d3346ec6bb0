"""The Dockerfile builds the image the KubeRay manifest runs: the same tag, on rayproject/ray of the
Ray this project is tested with (the manifest's rayVersion), the project installed non-editable."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import ray

from tests.test_manifests import groups, rayservice  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def test_the_manifest_runs_the_image_the_dockerfile_builds(rayservice):  # noqa: F811
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = f"moe-serve:{version}-gpu"
    images = {c["image"] for g in groups(rayservice) for c in g["template"]["spec"]["containers"]}
    assert images == {tag}
    assert re.findall(r"docker build -t (\S+) \.", DOCKERFILE) == [tag]
    assert f'org.opencontainers.image.version="{version}"' in DOCKERFILE


def test_the_base_is_rays_image_of_the_tested_ray(rayservice):  # noqa: F811
    steps = instructions()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    (base,) = [a for k, a in steps if k == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    ray_version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert ray_version == ray.__version__
    assert base == f"rayproject/ray:{ray_version}-py311-gpu"


def test_the_project_is_installed_not_editable():
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    (copy,) = [a for k, a in instructions() if k == "COPY"]
    src = copy.split()[-1]
    assert f"pip install --no-cache-dir {src}" in runs
    assert not re.search(r"pip install[^&]*(\s-e\s|--editable)", runs)
    assert "moe-serve init-model /home/ray/models/tiny" in runs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "models", ".git"} <= set(ignored)
