"""`--arrival`/`--cv`, shared by `cascade plan`, `bench sim|compare|live` and `trace gen`, run
as a user would: a `--cv` that Poisson arrivals would ignore is refused, not dropped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASCADE = str(Path(sys.executable).parent / "cascade")

COMMANDS = {
    "plan": ["plan", "--instances", "4", "--workload", "short-chat"],
    "bench sim": ["bench", "sim", "--workload", "short-chat", "--requests", "50"],
    "bench compare": ["bench", "compare", "--workload", "short-chat", "--requests", "50"],
    "bench live": ["bench", "live", "--address", "127.0.0.1:1", "--workload", "short-chat"],
    "trace gen": ["trace", "gen", "--workload", "short-chat", "--requests", "5", "--rate", "1"],
}


def cascade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CASCADE, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("arrival", [[], ["--arrival", "poisson"]], ids=["default", "poisson"])
@pytest.mark.parametrize("command", COMMANDS)
def test_cv_without_gamma_arrivals_is_a_usage_error(
    command: str, arrival: list[str], tmp_path: Path
) -> None:
    """It used to run as Poisson: `cascade plan ... --cv 3` printed the plan without `--cv`."""
    out_file = tmp_path / "t.jsonl"
    args = [*COMMANDS[command], *arrival, "--cv", "3"]
    if command == "trace gen":
        args += ["--out", str(out_file)]
    out = cascade(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith(f"usage: cascade {command} "), out.stderr
    assert f"cascade {command}: error: --cv needs --arrival gamma" in out.stderr
    assert out.stdout == "" and not out_file.exists(), "nothing ran"


def test_gamma_arrivals_without_cv_keep_the_default_of_1(tmp_path: Path) -> None:
    def gen(name: str, *arrival: str) -> str:
        path = tmp_path / name
        args = [*COMMANDS["trace gen"], "--requests", "200", *arrival, "--out", str(path)]
        out = cascade(*args)
        assert out.returncode == 0, out.stderr
        return path.read_text()

    default = gen("default.jsonl", "--arrival", "gamma")
    assert default == gen("cv1.jsonl", "--arrival", "gamma", "--cv", "1")
    assert default != gen("cv3.jsonl", "--arrival", "gamma", "--cv", "3")
