"""`cascade up` brings a real local cluster up, runs its demo through the scheduler, and stops."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

CASCADE = str(Path(sys.executable).parent / "cascade")


def test_up_with_sim_workers_runs_the_demo_and_stops_cleanly() -> None:
    out = subprocess.run(
        [
            CASCADE,
            "up",
            "--engine",
            "sim",
            "--workers",
            "3",
            "--http-port",
            "0",
            "--exit-after-demo",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("auth token ") for line in lines), "the cluster has a token"
    stage_rows = [
        line
        for line in lines
        if line.strip()[:1].isdigit() and "127.0.0.1" in line and "yes" not in line
    ]
    assert len(stage_rows) == 3, out.stdout
    demos = [line for line in lines if line.startswith("demo-") and "text" not in line]
    assert len(demos) == 3
    text_demo = [line for line in lines if line.startswith("demo-text: 24 tokens (length)")]
    assert len(text_demo) == 1, out.stdout
    assert "migrations 1" in demos[1], "the second demo request grows past the first bound"
    assert all("(length)" in d for d in demos)
    assert lines[-1] == "cluster stopped"


def test_up_on_ports_another_cluster_holds_says_why_and_exits() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [CASCADE, "up", "--engine", "sim", "--workers", "1", "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cascade up: error: cascade-scheduler" in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.splitlines()[-1] == "cluster stopped"
