#!/usr/bin/env bash
# Regenerates the Python stubs of proto/cascadeinfer/v1/*.proto into
# python/cascadeinfer/proto/v1/ (messages, gRPC stubs, and typed .pyi for mypy).
# tests/test_proto_stubs.py runs this into a temporary folder and fails on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-python/cascadeinfer/proto/v1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m grpc_tools.protoc -I proto \
    --python_out="$tmp" --grpc_python_out="$tmp" \
    --plugin=protoc-gen-mypy=.venv/bin/protoc-gen-mypy --mypy_out="$tmp" \
    --plugin=protoc-gen-mypy_grpc=.venv/bin/protoc-gen-mypy_grpc --mypy_grpc_out="$tmp" \
    proto/cascadeinfer/v1/*.proto
mkdir -p "$out"
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
for f in "$tmp"/cascadeinfer/v1/*; do
    # protoc writes imports for the proto package path; the stubs live one level deeper.
    sed -e 's/^from cascadeinfer\.v1 import/from cascadeinfer.proto.v1 import/' \
        -e 's/^import cascadeinfer\.v1\./import cascadeinfer.proto.v1./' "$f" > "$out/$(basename "$f")"
done
touch "$out/__init__.py" "$(dirname "$out")/__init__.py"
