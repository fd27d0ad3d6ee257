"""An engine that dies during the warm-up request, before the worker reports SERVING (vLLM's
engine core killed, or a model that fails on its first forward pass), ends the daemon with a
one-line fatal error and exit 1, not a traceback. In process, with a sim engine whose steps
fail: the real-vLLM death path is `test_worker_daemon.py`'s."""

from __future__ import annotations

import asyncio

import pytest
from cascadeinfer.daemon import FatalError
from cascadeinfer.worker import server
from cascadeinfer.worker.config import WorkerConfig, parse_args
from cascadeinfer.worker.engine import StepReport
from cascadeinfer.worker.engines.sim_engine import SimEngine


class DiesOnFirstStep(SimEngine):
    def step(self) -> StepReport:
        raise RuntimeError("the model's first forward pass failed")

    def check_health(self) -> None:
        raise RuntimeError("the engine is gone")


def test_an_engine_dead_in_warm_up_is_a_fatal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    shut_down: list[bool] = []

    def build(config: WorkerConfig) -> SimEngine:
        engine = DiesOnFirstStep(config.sim)
        monkeypatch.setattr(engine, "shutdown", lambda: shut_down.append(True))
        return engine

    monkeypatch.setattr(server, "build_engine", build)
    config = parse_args(["--engine", "sim", "--host", "127.0.0.1", "--port", "0"])
    with pytest.raises(FatalError, match="during warm-up, before serving"):
        asyncio.run(asyncio.wait_for(server.serve(config), 30))
    assert shut_down == [True]


def test_run_daemon_turns_it_into_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(server, "build_engine", lambda config: DiesOnFirstStep(config.sim))
    with pytest.raises(SystemExit) as e:
        server.main(["--engine", "sim", "--host", "127.0.0.1", "--port", "0"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "cascade-worker: fatal: the engine died during warm-up" in err
    assert "Traceback" not in err
