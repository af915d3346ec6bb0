#!/usr/bin/env bash
# Regenerates the Python stubs in protos/moe/v1 from the .proto files beside them.
set -euo pipefail
cd "$(dirname "$0")/../protos"
"${PYTHON:-python3}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. moe/v1/*.proto
touch moe/__init__.py moe/v1/__init__.py
