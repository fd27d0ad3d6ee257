"""`cascade trace gen` and `cascade trace stats` on the data-derived workloads and shifts, run as
a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cascadeinfer.traces import read_trace

CASCADE = str(Path(sys.executable).parent / "cascade")


def cascade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CASCADE, *args], capture_output=True, text=True, timeout=600)


def test_trace_gen_writes_a_shifting_trace(tmp_path: Path) -> None:
    path = tmp_path / "shift.jsonl"
    out = cascade(
        "trace", "gen", "--workload", "shift:sharegpt,long-context-mixed@0.4", "--requests",
        "1000", "--rate", "4", "--arrival", "gamma", "--cv", "2", "--out", str(path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    trace = read_trace(path)
    assert len(trace) == 1000
    before, after = trace[:400], trace[400:]
    assert max(r.prompt_len for r in before) < 32_768 <= max(r.prompt_len for r in after)


def test_trace_stats_of_a_preset_and_of_a_trace_file(tmp_path: Path) -> None:
    out = cascade("trace", "stats", "reasoning", "--requests", "5000", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["requests"] == 5000
    assert doc["output"]["median"] > 3 * doc["prompt"]["median"], "reasoning outputs dominate"
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 10, "output_len": 5}\n' * 3)
    table = cascade("trace", "stats", str(path))
    assert table.returncode == 0, table.stderr
    assert "3 requests" in table.stdout and "prompt" in table.stdout


def test_an_unknown_workload_is_refused_with_the_known_names() -> None:
    out = cascade("trace", "gen", "--workload", "shift:sharegpt", "--requests", "5",
                  "--rate", "1", "--out", "/dev/null")  # fmt: skip
    assert out.returncode != 0
    assert "two or more" in out.stderr and "sharegpt-multiturn" in out.stderr
