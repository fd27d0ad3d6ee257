#!/usr/bin/env bash
# Regenerates the Go code of the client API (scheduler.proto and what it imports) into
# clients/go/gen/cascadeinfer/v1/ with the pinned protoc-gen-go and protoc-gen-go-grpc that
# scripts/bootstrap.sh installs into .venv/bin. protoc itself is the one bundled in grpcio-tools,
# as for the Python stubs. The .proto files carry no go_package: the import path is given here.
# tests/test_go_client_stubs.py runs this into a temporary folder and fails on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-clients/go/gen}
pkg="github.com/cascadeinfer/cascadeinfer/clients/go/gen/cascadeinfer/v1;cascadeinferv1"
files=(cascadeinfer/v1/common.proto cascadeinfer/v1/scheduler.proto)
maps=()
for f in "${files[@]}"; do
    maps+=("--go_opt=M$f=$pkg" "--go-grpc_opt=M$f=$pkg")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m grpc_tools.protoc -I proto \
    --plugin=protoc-gen-go=.venv/bin/protoc-gen-go --go_out="$tmp" --go_opt=paths=source_relative \
    --plugin=protoc-gen-go-grpc=.venv/bin/protoc-gen-go-grpc --go-grpc_out="$tmp" \
    --go-grpc_opt=paths=source_relative "${maps[@]}" \
    "${files[@]/#/proto/}"
mkdir -p "$out/cascadeinfer/v1"
rm -f "$out"/cascadeinfer/v1/*.pb.go
cp "$tmp"/cascadeinfer/v1/*.pb.go "$out/cascadeinfer/v1/"
