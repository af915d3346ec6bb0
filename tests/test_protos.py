"""The generated stubs are what scripts/gen_protos.sh makes from the .proto files beside them."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos",
                    ignore=shutil.ignore_patterns("*_pb2*.py", "*_pb2.pyi", "__pycache__"))
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen_protos.sh", tmp_path / "scripts")
    subprocess.run(["bash", str(tmp_path / "scripts" / "gen_protos.sh")], check=True,
                   env=dict(os.environ, PYTHON=sys.executable))
    fresh, ours = tmp_path / "protos" / "moe" / "v1", ROOT / "protos" / "moe" / "v1"
    generated = sorted(p.name for p in fresh.glob("*_pb2*.py*"))
    assert generated and generated == sorted(p.name for p in ours.glob("*_pb2*.py*"))
    # The grpc stubs name the grpcio-tools release that wrote them and need at least that grpcio at
    # run time: a newer release on a fresh install is not drift.
    mismatch = [n for n in generated if _unversioned(fresh / n) != _unversioned(ours / n)]
    assert not mismatch, f"stubs drifted from the .proto files: run `make protos` ({mismatch})"


def _unversioned(path: Path) -> str:
    return re.sub(r"^GRPC_GENERATED_VERSION = .*$", "", path.read_text(), flags=re.M)


def test_stubs_need_no_newer_grpcio_than_installed():
    import grpc
    for path in (ROOT / "protos" / "moe" / "v1").glob("*_pb2_grpc.py"):
        wrote = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text(), flags=re.M).group(1)
        assert _release(wrote) <= _release(grpc.__version__), f"{path.name} needs grpcio >= {wrote}"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", version)[:3])
