"""JSONL request traces: one request a line, `{"arrival_s": ..., "prompt_len": ..., "output_len": ...}`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


class TraceError(ValueError):
    """A trace line that is not a valid request; the message names the file and line."""


def _field(obj: dict[str, object], name: str, where: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{where}: field {name!r} must be a number, got {value!r}")
    return float(value)


def _parse_line(line: str, where: str) -> TraceRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object")
    arrival = _field(obj, "arrival_s", where)
    prompt = _field(obj, "prompt_len", where)
    output = _field(obj, "output_len", where)
    if arrival < 0:
        raise TraceError(f"{where}: arrival_s must be >= 0, got {arrival}")
    for name, value in (("prompt_len", prompt), ("output_len", output)):
        if value < 1 or value != int(value):
            raise TraceError(f"{where}: {name} must be a positive integer, got {value}")
    return TraceRequest(arrival, int(prompt), int(output))


def read_trace(path: str | Path) -> list[TraceRequest]:
    """All requests of a JSONL trace, sorted by arrival; blank lines are skipped."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_parse_line(line, f"{path}:{number}"))
    if not requests:
        raise TraceError(f"{path}: no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            record = {
                "arrival_s": r.arrival_s,
                "prompt_len": r.prompt_len,
                "output_len": r.output_len,
            }
            f.write(json.dumps(record) + "\n")


def arrival_rate(requests: list[TraceRequest]) -> float:
    """Requests per second over the trace's span."""
    span = requests[-1].arrival_s - requests[0].arrival_s
    if len(requests) < 2 or span <= 0:
        raise TraceError("a trace needs at least two distinct arrival times to define a rate")
    return (len(requests) - 1) / span
