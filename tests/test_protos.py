"""The generated stubs are what scripts/gen_protos.sh makes from the .proto files beside them."""
import filecmp
import os
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
    _, mismatch, errors = filecmp.cmpfiles(fresh, ours, generated, shallow=False)
    assert not mismatch and not errors, f"stubs drifted from the .proto files: run `make protos` ({mismatch})"
