"""JSONL request traces: one request a line, `{"arrival_s": ..., "prompt_len": ..., "output_len": ...}`,
and for a turn of a multi-turn session also `"session_id"` (string or integer), `"turn"` (0 for
the first) and `"prefix_len"` (leading prompt tokens shared with the previous turn's prompt and
output); docs/design/workloads.md describes the format.

In memory a trace is a list of tuples (`TraceEntry`): `(arrival_s, prompt_len, output_len)`, or
`(arrival_s, prompt_len, output_len, session, turn, prefix_len)` with a dense integer session;
`_core.simulate` takes either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TraceEntry = tuple[float, int, int] | tuple[float, int, int, int, int, int]


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    session_id: str | None = None
    """The conversation the request is a turn of; None outside any session."""
    turn: int = 0
    prefix_len: int = 0
    """Leading prompt tokens identical to the previous turn's prompt and output."""


def with_lengths(entry: TraceEntry, prompt_len: int, output_len: int) -> TraceEntry:
    """`entry` with new lengths; a session's shared prefix stays inside the prompt."""
    if len(entry) == 3:
        return (entry[0], prompt_len, output_len)
    _, _, _, session, turn, prefix_len = entry
    return (entry[0], prompt_len, output_len, session, turn, min(prefix_len, prompt_len - 1))


def to_entries(
    requests: Iterable[TraceRequest], t0: float = 0.0, scale: float = 1.0
) -> list[TraceEntry]:
    """Trace tuples for `requests`, arrivals `(arrival_s - t0) * scale`; session ids become
    dense integers in order of first appearance."""
    dense: dict[str, int] = {}
    out: list[TraceEntry] = []
    for r in requests:
        arrival = (r.arrival_s - t0) * scale
        if r.session_id is None:
            out.append((arrival, r.prompt_len, r.output_len))
        else:
            session = dense.setdefault(r.session_id, len(dense))
            out.append((arrival, r.prompt_len, r.output_len, session, r.turn, r.prefix_len))
    return out


def from_entries(entries: Iterable[TraceEntry]) -> list[TraceRequest]:
    """The inverse of `to_entries` (session ids written as their integers)."""
    out = []
    for e in entries:
        if len(e) == 3:
            out.append(TraceRequest(e[0], e[1], e[2]))
        else:
            out.append(TraceRequest(e[0], e[1], e[2], str(e[3]), e[4], e[5]))
    return out


class TraceError(ValueError):
    """A trace line that is not a valid request; the message names the file and line."""


MAX_ARRIVAL_S = 1e12
"""Latest arrival a trace may name (about 31,700 years): Unix times fit, and the gaps' squares
stay finite (1e308 overflowed the burstiness estimate)."""
MAX_COUNT = 2**31 - 1
"""Largest token count or turn index: the core holds them in 32 bits."""


def _field(obj: dict[str, object], name: str, where: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{where}: field {name!r} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TraceError(f"{where}: field {name!r} must be finite, got {value}")
    limit = MAX_ARRIVAL_S if name == "arrival_s" else MAX_COUNT
    if abs(value) > limit:
        raise TraceError(f"{where}: field {name!r} = {value} is out of range (at most {limit:g})")
    return float(value)


def _parse_line(line: str, where: str) -> TraceRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not JSON ({e.msg})") from None
    except RecursionError:
        raise TraceError(f"{where}: JSON nested too deeply") from None
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
    if "session_id" not in obj:
        return TraceRequest(arrival, int(prompt), int(output))
    session = obj["session_id"]
    if isinstance(session, bool) or not isinstance(session, str | int):
        raise TraceError(
            f"{where}: field 'session_id' must be a string or an integer, got {session!r}"
        )
    turn = _field(obj, "turn", where) if "turn" in obj else 0.0
    prefix = _field(obj, "prefix_len", where) if "prefix_len" in obj else 0.0
    if turn < 0 or turn != int(turn):
        raise TraceError(f"{where}: turn must be an integer >= 0, got {turn}")
    if prefix < 0 or prefix != int(prefix) or prefix >= prompt:
        raise TraceError(f"{where}: prefix_len must be an integer in [0, prompt_len), got {prefix}")
    return TraceRequest(arrival, int(prompt), int(output), str(session), int(turn), int(prefix))


def read_trace(path: str | Path) -> list[TraceRequest]:
    """All requests of a JSONL trace, sorted by arrival; blank lines are skipped."""
    requests = []
    # utf-8-sig: a byte-order mark, as editors on Windows write one, is not part of line 1.
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_parse_line(line, f"{path}:{number}"))
    if not requests:
        raise TraceError(f"{path}: no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            record: dict[str, object] = {
                "arrival_s": r.arrival_s,
                "prompt_len": r.prompt_len,
                "output_len": r.output_len,
            }
            if r.session_id is not None:
                record |= {"session_id": r.session_id, "turn": r.turn, "prefix_len": r.prefix_len}
            f.write(json.dumps(record) + "\n")


def arrival_rate(requests: list[TraceRequest]) -> float:
    """Requests per second over the trace's span (sorted `requests`); `math.inf` when they all
    arrive at the same instant, as an offline batch does (a single request included)."""
    span = requests[-1].arrival_s - requests[0].arrival_s
    if len(requests) < 2 or span <= 0:
        return math.inf
    return (len(requests) - 1) / span
