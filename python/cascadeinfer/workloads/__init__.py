"""Every workload name in one registry: the core's parametric presets, presets built from real
data (ShareGPT), and traffic shifts between them (`shift:A,B[@F]`). Planning, the benchmarks and
`cascade trace` resolve names here, so a name works everywhere or nowhere.

docs/design/workloads.md documents each preset against the public statistics it imitates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cascadeinfer import _core
from cascadeinfer.traces import TraceEntry
from cascadeinfer.workloads import sharegpt

Lengths = tuple[list[int], list[int]]
Trace = list[TraceEntry]

SHIFT_PREFIX = "shift:"
SHIFT_SYNTAX = "shift:A,B[,C...][@F1[,F2...]]"
_SEED_STRIDE = 0x9E37_79B9_7F4A_7C15
"""Seed offset between the phases of a shift (the SplitMix64 increment), so phases that name
the same preset draw different requests."""


class UnknownWorkloadError(ValueError):
    """A name that is neither a built-in workload nor a valid shift between built-ins."""


@dataclass(frozen=True)
class Preset:
    """A named source of `(prompt_len, output_len)` pairs, deterministic for a seed. Every pair
    has both lengths >= 1 and their sum <= `max_len`."""

    name: str
    max_len: int
    draw: Callable[[int, int], Lengths]
    draw_turns: Callable[[int, int], sharegpt.Turns] | None = None
    """For a multi-turn preset drawn outside the core: `draw` with each request's session."""

    def sample(self, n: int, seed: int = 0) -> Lengths:
        """`n` pairs as two lists."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.draw(n, seed)

    def trace(
        self, n: int, rate: float, arrival: str = "poisson", cv: float = 1.0, seed: int = 0
    ) -> Trace:
        """`(arrival_s, prompt_len, output_len)` for `n` requests arriving at `rate` a second
        ("poisson", or "gamma" with inter-arrival coefficient of variation `cv`), sorted by
        arrival. A multi-turn preset's requests are `(arrival_s, prompt_len, output_len,
        session, turn, prefix_len)`, its sessions starting by the process and their turns
        following (`_core.session_arrival_times`). For a core preset this is
        `_core.generate_trace` for the same arguments."""
        if self.draw_turns is not None:
            prompts, outputs, sessions = self.draw_turns(n, seed)
            times = _core.session_arrival_times(sessions, rate, arrival, cv, seed)
            entries: Trace = [
                (t, p, o) if s is None else (t, p, o, *s)
                for t, p, o, s in zip(times, prompts, outputs, sessions, strict=True)
            ]
            return sorted(entries, key=lambda e: e[0])
        if self.name in _CORE_NAMES:
            return _core.generate_trace(self.name, n, rate, arrival, cv, seed)
        times = _core.arrival_times(n, rate, arrival, cv, seed)
        prompts, outputs = self.sample(n, seed)
        return list(zip(times, prompts, outputs, strict=True))


def _core_preset(name: str) -> Preset:
    def draw(n: int, seed: int) -> Lengths:
        return _core.sample_preset(name, n, seed)

    return Preset(name, _core.preset_max_len(name), draw)


_CORE_NAMES = frozenset(_core.preset_names())
_DATA_PRESETS = (
    Preset("sharegpt", sharegpt.SINGLE_TURN_MAX_LEN, sharegpt.first_turns),
    Preset(
        "sharegpt-multiturn",
        sharegpt.MULTI_TURN_MAX_LEN,
        sharegpt.multi_turn,
        sharegpt.multi_turn_sessions,
    ),
)
_BUILTINS: dict[str, Preset] = {
    **{name: _core_preset(name) for name in _core.preset_names()},
    **{p.name: p for p in _DATA_PRESETS},
}


def names() -> list[str]:
    """The built-in workload names (a shift between them is a name too)."""
    return list(_BUILTINS)


def describe_names() -> str:
    """The names for a command's help text."""
    return f"{', '.join(names())}, or {SHIFT_SYNTAX}"


def is_workload(name: str) -> bool:
    """Whether `name` means a workload rather than a file: a built-in, or any name in the shift
    form (`get` says what is wrong with a malformed one)."""
    return name in _BUILTINS or name.startswith(SHIFT_PREFIX)


def not_found(name: str) -> UnknownWorkloadError:
    """The error for a name that is neither a workload nor a trace file."""
    return UnknownWorkloadError(
        f"workload {name!r} is neither a preset ({describe_names()}) nor a trace file"
    )


def get(name: str) -> Preset:
    """The workload called `name`. A shift `shift:A,B` draws the first half of the requests
    from A and the rest from B; `shift:A,B,C@0.2,0.7` switches at 20% and 70% of them."""
    if name.startswith(SHIFT_PREFIX):
        return _shift(name)
    preset = _BUILTINS.get(name)
    if preset is None:
        raise UnknownWorkloadError(f"unknown workload {name!r}; known: {describe_names()}")
    return preset


def _shift(name: str) -> Preset:
    spec, _, at = name.removeprefix(SHIFT_PREFIX).partition("@")
    phases = spec.split(",")
    if len(phases) < 2 or any(p not in _BUILTINS for p in phases):
        raise UnknownWorkloadError(
            f"workload {name!r}: a shift is {SHIFT_SYNTAX}, between two or more of {', '.join(names())}"
        )
    if at:
        try:
            points = [float(x) for x in at.split(",")]
        except ValueError:
            raise UnknownWorkloadError(f"workload {name!r}: shift points must be numbers") from None
    else:
        points = [k / len(phases) for k in range(1, len(phases))]
    if len(points) != len(phases) - 1 or not all(
        a < b for a, b in zip([0.0, *points], [*points, 1.0], strict=True)
    ):
        raise UnknownWorkloadError(
            f"workload {name!r}: {len(phases) - 1} shift point(s) in (0, 1), increasing, expected"
        )
    presets = [_BUILTINS[p] for p in phases]

    def draw(n: int, seed: int) -> Lengths:
        return _concatenate(presets, points, n, seed)

    return Preset(name, max(p.max_len for p in presets), draw)


def _concatenate(presets: Sequence[Preset], points: Sequence[float], n: int, seed: int) -> Lengths:
    """Phase k holds requests [round(points[k-1] n), round(points[k] n)); the first phase uses
    `seed` itself, so it is the first preset's own stream."""
    bounds = [0, *(round(p * n) for p in points), n]
    prompts: list[int] = []
    outputs: list[int] = []
    for k, preset in enumerate(presets):
        phase_seed = (seed + k * _SEED_STRIDE) % 2**64
        p, o = preset.sample(bounds[k + 1] - bounds[k], phase_seed)
        prompts += p
        outputs += o
    return prompts, outputs


@dataclass(frozen=True)
class LengthStats:
    """What docs/design/workloads.md reports for each preset (`cascade trace stats`)."""

    mean: float
    median: float
    p99: int
    max: int


def length_stats(values: Sequence[int]) -> LengthStats:
    """Mean, median, 99th percentile (nearest rank) and maximum of `values`."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
    return LengthStats(statistics.fmean(ordered), statistics.median(ordered), p99, ordered[-1])
