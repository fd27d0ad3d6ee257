"""The Go client in clients/go, built from code generated from the .proto, against a real
cascade-scheduler with sim workers: it streams every token once, in order, across a migration,
gets the same tokens as the Python client, and exits with the gRPC status code of a refusal."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cascadeinfer.cli.client import generate, scheduler_stub

from tests.worker.daemons import Daemon, sim_cluster

GO_MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"
# Exit statuses are gRPC status codes.
INVALID_ARGUMENT, UNAVAILABLE = 3, 14


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    assert go is not None, "the Go toolchain is needed to build clients/go"
    binary = tmp_path_factory.mktemp("go") / "cascade-generate"
    # go.sum is committed, so the build checks every module it downloads; no VCS stamping, which
    # fails in a checkout git does not trust.
    out = subprocess.run(
        [go, "build", "-buildvcs=false", "-o", str(binary), "./cmd/cascade-generate"],
        cwd=GO_MODULE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return binary


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    logs = tmp_path_factory.mktemp("logs")
    with sim_cluster(2, ["--stages", "0-256:1,256-8192:1"], logs) as (daemon, _):
        yield daemon


def run_go(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "--timeout", "60s", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_streams_every_token_once_across_a_migration(go_client: Path, scheduler: Daemon) -> None:
    prompt = [(7 * k) % 991 + 1 for k in range(200)]
    out = run_go(
        go_client,
        "--address",
        scheduler.address,
        "--prompt-token-ids",
        ",".join(map(str, prompt)),
        "--max-tokens",
        "120",
    )
    assert out.returncode == 0, out.stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.stdout.splitlines()]
    *batches, summary = lines
    assert len(batches) > 1, "tokens should arrive as a stream, not in one message"
    indices = [b["first_index"] + k for b in batches for k in range(len(b["token_ids"]))]
    assert indices == list(range(120)), "every index 0..n-1 exactly once, in order"
    tokens = [t for b in batches for t in b["token_ids"]]
    assert summary["finish_reason"] == "length"
    assert summary["num_tokens"] == 120
    assert summary["timings"]["num_migrations"] == 1, "crossed the stage bound at 256"
    assert 0 < summary["timings"]["ttft_s"] <= summary["timings"]["total_s"]
    assert {b["request_id"] for b in batches} == {summary["request_id"]}
    # The same prompt through the Python stubs: one API, the same output in both languages.
    assert tokens == generate(scheduler_stub(scheduler.address), prompt, 120).token_ids


@pytest.mark.parametrize(
    "prompt_args",
    [
        ["--prompt-token-ids", "1,2,3", "--max-tokens", "0"],
        ["--prompt-token-ids", ",", "--max-tokens", "5"],
        ["--text", "hi", "--max-tokens", "5"],
    ],
    ids=["max-tokens-0", "empty-prompt", "text-without-tokenizer"],
)
def test_bad_request_exits_with_invalid_argument(
    go_client: Path, scheduler: Daemon, prompt_args: list[str]
) -> None:
    out = run_go(go_client, "--address", scheduler.address, *prompt_args)
    assert out.returncode == INVALID_ARGUMENT, out.stderr
    assert out.stderr.startswith("cascade-generate: INVALID_ARGUMENT: ")
    assert out.stdout == ""


def test_no_server_exits_with_unavailable(go_client: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_go(go_client, "--address", f"127.0.0.1:{port}", "--prompt-token-ids", "1,2,3")
    assert out.returncode == UNAVAILABLE, out.stderr
    assert out.stderr.startswith("cascade-generate: UNAVAILABLE: ")
