"""`cascade up` brings a real local cluster up, runs its demo through the scheduler, and stops."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

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
    tokens = [line.split()[2] for line in lines if line.startswith("auth token ")]
    assert len(tokens) == 1, "the cluster has a token"
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
    assert "sim engine: no model" in text_demo[0] and "weights" not in text_demo[0]
    assert "migrations 1" in demos[1], "the second demo request grows past the first bound"
    assert all("(length)" in d for d in demos)
    assert lines[-1] == "cluster stopped"
    # The stopped cluster's token is gone from /tmp; its logs stay where the first line said.
    log_dir = Path(re.findall(r"\(logs in (\S+)\)", out.stdout)[0])
    assert Path(tokens[0]).parent == log_dir and not Path(tokens[0]).exists()
    assert (
        sorted(p.name.split("-")[1] for p in log_dir.glob("*.log"))
        == ["scheduler"] + ["worker"] * 3
    )


def _refused_before_starting(args: list[str], timeout: float) -> str:
    """Runs `cascade up --engine sim ARGS`, checks it exits 2 with no traceback and nothing
    started (stdout empty), and returns its stderr."""
    out = subprocess.run(
        [CASCADE, "up", "--engine", "sim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == "", "nothing started"
    return out.stderr


@pytest.mark.parametrize("count", ["0", "-1", "100000"])
def test_up_with_no_workers_or_too_many_says_so_before_starting_anything(count: str) -> None:
    """`--workers 0` ended in a ZeroDivisionError traceback; `-1` made a directory, started
    nothing and failed on `min() arg is an empty sequence`; a hundred thousand would all have
    started at once."""
    stderr = _refused_before_starting(["--workers", count, "--http-port", "0"], timeout=60)
    assert f"cascade up: error: --workers {count}: must be in [1, 64]" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "port = 70000: must be in [0, 65535]"),
        (["--http-port", "-1"], "http_port = -1: must be in [0, 65535]"),
        (["--sim-time-scale", "nan"], "sim time_scale = nan"),
        (["--rate", "nan"], "argument --rate: rate = nan: must be in"),
        (["--stages", "garbage"], "--stages 'garbage': expected MIN-MAX:WORKERS"),
        (["--profile", "nonexistent"], "profile 'nonexistent' is neither a built-in"),
        (["--workload", "nonexistent"], "workload 'nonexistent' is neither a preset"),
        (["--model", "/nonexistent"], "--model is for --engine vllm"),
        (["--stop-timeout-s", "0"], "--stop-timeout-s = 0.0: must be a finite number > 0"),
    ],
)
def test_a_value_a_daemon_would_refuse_is_refused_before_any_starts(
    args: list[str], message: str
) -> None:
    """Each started the workers, then failed (exit 1) when a daemon refused it, and left a log
    directory in /tmp; `--model` with the sim engine was silently ignored."""
    stderr = _refused_before_starting(["--workers", "1", "--http-port", "0", *args], timeout=60)
    assert f"cascade up: error: {message}" in stderr, stderr


@pytest.mark.parametrize("flag", ["--http-port", "--port"])
def test_up_on_ports_another_cluster_holds_says_why_and_how_to_recover(flag: str) -> None:
    """A second `cascade up` meets the first one's HTTP port (8000 by default): it says so, and
    which flag picks another, before starting any worker (a vLLM one takes minutes)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--workers", "1", "--http-port", "0", flag, str(port)]
        stderr = _refused_before_starting(args, timeout=300)
    assert f"cascade up: error: cannot listen on 127.0.0.1:{port}" in stderr
    assert f"choose another with {flag} PORT (0 picks a free port)" in stderr


def test_a_port_taken_while_the_workers_start_gets_the_same_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check before starting cannot hold the port: when the scheduler then fails to bind
    it, its own error is followed by the hint."""
    from cascadeinfer.cli import up
    from cascadeinfer.cli.main import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # `run` would set it for its workers
    with socket.socket() as taken:
        # SO_REUSEADDR and not listening yet: the check's own bind passes, as for a free port.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        real_serve = up._serve

        def serve_after_the_port_is_taken(*args: Any) -> int:
            taken.listen()  # as a second cluster would, between the check and the bind
            return real_serve(*args)

        monkeypatch.setattr(up, "_serve", serve_after_the_port_is_taken)
        code = main(["up", "--engine", "sim", "--workers", "1", "--http-port", str(port)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"http_port = {port}: cannot listen on 127.0.0.1:{port}" in err, "the scheduler's"
    assert "choose another with --http-port PORT (0 picks a free port)" in err


def _up_with_sim_workers(
    num_workers: int, log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """`cascade up` with sim workers and no demo (and `extra` flags), its output in `log`."""
    args = ["up", "--engine", "sim", "--workers", str(num_workers), "--http-port", "0", *extra]
    with open(log, "w") as out:
        return subprocess.Popen(
            [CASCADE, *args, "--no-demo"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            # As from a terminal: a test run started in the background (`cmd &` in a script,
            # nohup) ignores SIGINT, and the child would inherit that and never see the Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _wait_until_serving(process: subprocess.Popen[str], log: Path) -> None:
    """Until `cascade up` says how to stop the cluster it serves."""
    deadline = time.monotonic() + 120
    while "Ctrl-C stops" not in log.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)


@contextlib.contextmanager
def _serving_up(
    num_workers: int, log: Path, extra: Sequence[str] = ()
) -> Iterator[subprocess.Popen[str]]:
    """`cascade up` with sim workers, once it serves; killed on the way out if still running."""
    process = _up_with_sim_workers(num_workers, log, extra)
    try:
        _wait_until_serving(process, log)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _assert_all_ended(started: list[Any]) -> None:
    """Every process in `started` (psutil processes) is gone within 30 s."""
    import psutil

    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_a_second_ctrl_c_while_stopping_leaves_no_daemon_running(tmp_path: Path) -> None:
    """An impatient operator's second SIGINT (`kill -INT`, so only `cascade up` gets it) lands
    while the scheduler drains. Before, it ended `cascade up` with a traceback and the
    workers ran on, orphaned, on their ports."""
    log = tmp_path / "up.log"
    process = _up_with_sim_workers(2, log)
    try:
        _wait_until_serving(process, log)
        ports = [
            int(line.split()[1].rsplit(":", 1)[1])
            for line in log.read_text().splitlines()
            if line.startswith("worker ") and line.endswith("(sim)")
        ]
        assert len(ports) == 2, log.read_text()
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)  # the scheduler takes a second or two to drain
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        assert log.read_text().splitlines()[-1] == "cluster stopped", log.read_text()[-2000:]
        for port in ports:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"a worker still serves on {port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_while_a_vllm_engine_starts_stops_everything_it_started(tmp_path: Path) -> None:
    """Ctrl-C to `cascade up` alone (`kill -INT`) while its vLLM worker builds the engine: one
    line says so, exit 130, and no process it started is left. Before, a traceback, and the
    worker was killed outright, leaving its engine core to wait five minutes for a handshake."""
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [CASCADE, "up", "--engine", "vllm", "--workers", "1", "--http-port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        up = psutil.Process(process.pid)
        deadline = time.monotonic() + 180
        while True:
            started = up.children(recursive=True)
            titles = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
            if "spawn_main" in titles or "EngineCore" in titles:
                break  # the worker daemon has spawned vLLM's engine core
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no engine core appeared"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "cascade up: interrupted while starting" in text and "Traceback" not in text, text
    assert text.splitlines()[-1] == "cluster stopped"
    _, alive = psutil.wait_procs(started, timeout=15)
    running = [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not running, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_starting_stops_everything_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A supervisor's SIGTERM, or a closed terminal's SIGHUP, before the cluster serves. It
    used to end `cascade up` alone: its worker and scheduler served on, with nobody to stop
    them, and the token stayed in /tmp."""
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "up.log"
    process = _up_with_sim_workers(1, log)
    try:
        up = psutil.Process(process.pid)
        deadline = time.monotonic() + 60
        while not up.children() and time.monotonic() < deadline:  # a worker is starting
            time.sleep(0.05)
        started = up.children(recursive=True)
        assert started, log.read_text()
        process.send_signal(sig)
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        token_dir = re.search(r"logs in (\S+)\)", log.read_text())
        assert token_dir is not None and not (Path(token_dir.group(1)) / "token").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_killed_up_takes_its_daemons_with_it(tmp_path: Path) -> None:
    """SIGKILL of `cascade up` (an OOM kill, `kill -9`): nothing of it runs to stop its
    daemons, and they used to serve on, with nobody to stop them. Each is tied to it by a
    parent-death signal now, and drains and exits on it."""
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "up.log"
    with _serving_up(2, log) as process:
        started = psutil.Process(process.pid).children(recursive=True)
        assert len(started) == 3, [p.cmdline() for p in started]  # two workers, a scheduler
        process.kill()
        process.wait()
        _assert_all_ended(started)


def test_workers_that_do_not_stop_are_killed_together_and_named(tmp_path: Path) -> None:
    """Two frozen workers (SIGSTOP): `cascade up` stopped them one after another, a silent
    minute each, then said "cluster stopped" as if they had."""
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "up.log"
    with _serving_up(2, log, ["--stop-timeout-s", "3"]) as process:
        started = psutil.Process(process.pid).children(recursive=True)
        workers = [p for p in started if "cascade-worker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in started]
        for w in workers:
            w.suspend()
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        took = time.monotonic() - stopping
        text = log.read_text()
        assert text.count("did not stop within 3 s; killed") == 2, text[-2000:]
        assert took < 2 * 3, f"{took:.1f} s: the workers were waited on one after another"
        assert text.splitlines()[-1] == "cluster stopped"
        _assert_all_ended(started)


def test_up_says_when_a_daemon_exits_and_stops_the_cluster_when_the_scheduler_does(
    tmp_path: Path,
) -> None:
    """A worker killed under `cascade up` is reported once (and reaped), the cluster serving on;
    the scheduler's exit stops the rest and ends `cascade up` with 1. Before, `cascade up`
    waited on nothing: the dead daemons stayed zombies, and after its scheduler stopped it
    went on with "Ctrl-C stops the cluster" over a cluster that served nothing."""
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "up.log"
    with _serving_up(2, log) as process:
        up = psutil.Process(process.pid)
        started = up.children(recursive=True)
        workers = [p for p in started if "cascade-worker" in " ".join(p.cmdline())]
        (scheduler,) = [p for p in started if "cascade-scheduler" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in started]
        workers[0].kill()
        deadline = time.monotonic() + 30
        while "exited with code -9" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "1 of 2 still running" in text, text[-2000:]
        assert not workers[0].is_running(), "reaped, not left a zombie"
        assert process.poll() is None, "one worker's exit leaves the cluster serving"
        scheduler.terminate()
        assert process.wait(timeout=60) == 1, log.read_text()[-2000:]
        text = log.read_text()
        assert "the scheduler exited with code 0" in text and "stopping the cluster" in text, text
        assert text.splitlines()[-1] == "cluster stopped"
        assert text.count("exited with code") == 2, "each exit reported once"
        _assert_all_ended(started)
