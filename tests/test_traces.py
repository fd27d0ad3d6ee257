"""JSONL traces: round trip and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cascadeinfer.traces import TraceError, TraceRequest, arrival_rate, read_trace, write_trace


def test_round_trip_sorted_by_arrival(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    reqs = [TraceRequest(1.0, 10, 5), TraceRequest(0.0, 20, 7), TraceRequest(2.0, 30, 9)]
    write_trace(path, reqs)
    back = read_trace(path)
    assert [r.arrival_s for r in back] == [0.0, 1.0, 2.0]
    assert arrival_rate(back) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"arrival_s": 0, "prompt_len": 0, "output_len": 5}', "prompt_len"),
        ('{"arrival_s": 0, "prompt_len": 3, "output_len": 1.5}', "output_len"),
        ('{"arrival_s": -1, "prompt_len": 3, "output_len": 5}', "arrival_s"),
        ('{"arrival_s": 0, "prompt_len": "3", "output_len": 5}', "prompt_len"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 3, "output_len": 5}\n' + line + "\n")
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert f"{path}:2" in str(info.value)
