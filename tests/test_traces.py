"""JSONL traces: round trip and precise errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cascadeinfer.traces import (
    TraceError,
    TraceRequest,
    arrival_rate,
    from_entries,
    read_trace,
    to_entries,
    with_lengths,
    write_trace,
)


def test_round_trip_sorted_by_arrival(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    reqs = [TraceRequest(1.0, 10, 5), TraceRequest(0.0, 20, 7), TraceRequest(2.0, 30, 9)]
    write_trace(path, reqs)
    back = read_trace(path)
    assert [r.arrival_s for r in back] == [0.0, 1.0, 2.0]
    assert arrival_rate(back) == pytest.approx(1.0)


def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_the_editors_meant(
    tmp_path: Path,
) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"arrival_s": 0.0, "prompt_len": 10, "output_len": 5}\r\n'
        b'{"arrival_s": 1.0, "prompt_len": 20, "output_len": 7}\r\n\r\n'
    )
    assert [(r.prompt_len, r.output_len) for r in read_trace(path)] == [(10, 5), (20, 7)]


def test_a_trace_arriving_at_one_instant_has_an_infinite_rate() -> None:
    """An offline batch (or a single request): no span to divide by, and no rate below it."""
    assert arrival_rate([TraceRequest(3.0, 10, 5)] * 4) == math.inf
    assert arrival_rate([TraceRequest(3.0, 10, 5)]) == math.inf


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"arrival_s": 0, "prompt_len": 0, "output_len": 5}', "prompt_len"),
        ('{"arrival_s": 0, "prompt_len": 3, "output_len": 1.5}', "output_len"),
        ('{"arrival_s": -1, "prompt_len": 3, "output_len": 5}', "arrival_s"),
        ('{"arrival_s": 0, "prompt_len": "3", "output_len": 5}', "prompt_len"),
        ('{"arrival_s": 0, "prompt_len": 3, "output_len": 5, "session_id": [1]}', "session_id"),
        (
            '{"arrival_s": 0, "prompt_len": 3, "output_len": 5, "session_id": "a", "turn": -1}',
            "turn",
        ),
        (
            '{"arrival_s": 0, "prompt_len": 3, "output_len": 5, "session_id": "a", "prefix_len": 3}',
            "prefix_len",
        ),
        # Python's parser reads these tokens; each failed later as an OverflowError or a
        # TypeError traceback (not a ValueError), or as an error naming no line.
        ('{"arrival_s": 0, "prompt_len": Infinity, "output_len": 5}', "prompt_len.*finite"),
        ('{"arrival_s": NaN, "prompt_len": 3, "output_len": 5}', "arrival_s.*finite"),
        ('{"arrival_s": 1e308, "prompt_len": 3, "output_len": 5}', "arrival_s.*out of range"),
        (
            '{"arrival_s": 0, "prompt_len": 3, "output_len": 5, "session_id": "a", '
            '"turn": 99999999999999999999}',
            "turn.*out of range",
        ),
        ("[" * 200_000, "nested too deeply"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 3, "output_len": 5}\n' + line + "\n")
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert f"{path}:2" in str(info.value)


def test_sessions_round_trip_and_a_trace_without_them_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    reqs = [
        TraceRequest(0.0, 100, 20, "conv-a", 0, 0),
        TraceRequest(0.5, 50, 5),
        TraceRequest(30.0, 180, 10, "conv-a", 1, 120),
        TraceRequest(31.0, 40, 10, "7", 0, 0),
    ]
    write_trace(path, reqs)
    assert read_trace(path) == reqs
    lines = path.read_text().splitlines()
    assert "session_id" not in lines[1], "a request outside any session is written as before"
    # Session ids become dense integers for the core, in order of first appearance.
    assert to_entries(reqs) == [
        (0.0, 100, 20, 0, 0, 0),
        (0.5, 50, 5),
        (30.0, 180, 10, 0, 1, 120),
        (31.0, 40, 10, 1, 0, 0),
    ]
    assert [r.session_id for r in from_entries(to_entries(reqs))] == ["0", None, "0", "1"]


def test_shortening_a_prompt_keeps_its_shared_prefix_inside_it() -> None:
    assert with_lengths((0.0, 100, 20, 3, 1, 90), 50, 20) == (0.0, 50, 20, 3, 1, 49)
    assert with_lengths((0.0, 100, 20), 50, 10) == (0.0, 50, 10)
