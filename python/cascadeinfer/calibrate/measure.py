"""Drives an engine to hold one batch composition at a time and times its steps.

Engine-neutral: it adds requests and steps through the worker's `Engine` protocol, and a
`Probe` (vllm_probe.py, sim_probe.py) says what each step really held and how long it took. The
shapes that go into the fit are the observed ones, never the intended ones, so a batch the
engine split or cached differently is fitted as it ran (and a decode batch that was not held
whole is an error).
"""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cascadeinfer.calibrate.grid import DecodePoint, Limits, PrefillPoint
from cascadeinfer.worker.engine import Engine, EngineError, EngineRequest, SamplingSpec

TOKEN_IDS = range(3, 1000)
"""Prompt token ids: valid for the tiny model's 1,024-token vocabulary and for real models."""

MAX_SETUP_STEPS = 10_000


@dataclass(frozen=True)
class Shape:
    """One step's batch, in the cost model's terms (see cost.rs `BatchShape`)."""

    num_decode: int = 0
    sum_context: int = 0
    max_context: int = 0
    prefill_tokens: int = 0
    prefill_pairs: int = 0

    @property
    def padding(self) -> int:
        return self.num_decode * self.max_context - self.sum_context


def prefill_pairs(start: int, tokens: int) -> int:
    """Attention pairs of a chunk of `tokens` after `start` cached tokens (cost.rs)."""
    return tokens * start + tokens * (tokens + 1) // 2


@dataclass(frozen=True)
class Observation:
    shape: Shape
    time_s: float
    started: frozenset[str]
    """Requests that produced their first token in this step (their prefill ended)."""
    finished: frozenset[str]


@dataclass(frozen=True)
class EngineFacts:
    """An engine's configuration: the profile's non-timing fields and the description."""

    engine: str
    summary: str
    """Engine, version, model and KV layout, in words."""
    limits: Limits
    kv_bytes_per_token: int
    time_source: str
    """What a measured step time is (wall time of a vLLM step, the simulator's modelled time)."""


class Probe(Protocol):
    """One engine under calibration."""

    @property
    def engine(self) -> Engine: ...

    def facts(self) -> EngineFacts: ...

    def step(self) -> Observation:
        """Runs one engine step: what it held and how long it took."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Measurement:
    """One grid point: its timed steps and their median."""

    label: str
    kind: str
    """'decode' or 'prefill'."""
    shape: Shape
    """The middle timed step's shape (decode contexts grow by one token a step)."""
    time_s: float
    """Median of the timed steps."""
    times_s: tuple[float, ...]


@dataclass(frozen=True)
class Repeats:
    num_warmup: int
    """Steps (decode) or prefills run before the timed ones, per point and round."""
    num_timed: int
    num_rounds: int = 1
    """Passes over the grid, each in its own order; a point's time is the median of all."""


def _prompt(rng: random.Random, length: int) -> tuple[int, ...]:
    return tuple(rng.choice(TOKEN_IDS) for _ in range(length))


def _request(request_id: str, prompt: tuple[int, ...], max_tokens: int) -> EngineRequest:
    return EngineRequest(request_id, prompt, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


def measure_decode(
    probe: Probe, point: DecodePoint, repeats: Repeats, rng: random.Random
) -> list[Observation]:
    """Prefills the batch, then times decode steps in which exactly this batch runs; returns
    the timed steps."""
    engine = probe.engine
    ids: list[str] = []
    try:
        for length in point.prompt_lens:
            rid = f"{point.label}/{len(ids)}"
            room = engine.max_model_len - length
            engine.add_request(_request(rid, _prompt(rng, length), room))
            ids.append(rid)
        waiting = set(ids)
        for _ in range(MAX_SETUP_STEPS):
            obs = probe.step()
            _check_running(point.label, obs, ids)
            waiting -= obs.started
            if not waiting:
                break
        else:
            raise RuntimeError(f"{point.label}: not prefilled in {MAX_SETUP_STEPS} steps")
        steps: list[Observation] = []
        for _ in range(repeats.num_warmup + repeats.num_timed):
            obs = probe.step()
            _check_running(point.label, obs, ids)
            if obs.shape.num_decode != len(ids) or obs.shape.prefill_tokens:
                raise RuntimeError(f"{point.label}: the engine ran {obs.shape}, not the batch")
            steps.append(obs)
    finally:
        for rid in ids:
            # One that finished early is gone already; the error above says so.
            with contextlib.suppress(EngineError):
                engine.abort(rid)
    return steps[repeats.num_warmup :]


def _check_running(label: str, obs: Observation, ids: Iterable[str]) -> None:
    ended = obs.finished.intersection(ids)
    if ended:
        raise RuntimeError(f"{label}: {sorted(ended)} finished before the batch was measured")


def _run_to_end(probe: Probe, request: EngineRequest) -> list[Observation]:
    probe.engine.add_request(request)
    steps: list[Observation] = []
    while len(steps) < MAX_SETUP_STEPS:
        steps.append(probe.step())
        if request.request_id in steps[-1].finished:
            return steps
    raise RuntimeError(f"{request.request_id}: unfinished after {MAX_SETUP_STEPS} steps")


def measure_prefill(
    probe: Probe, point: PrefillPoint, repeats: Repeats, rng: random.Random
) -> list[Observation]:
    """Times the step that prefills `point.tokens` new tokens behind a cached prefix; each
    repeat has new tokens (the prefix cache must not cover them). The request asks for two
    tokens, so the timed step admits it but does not also finish it (a served request's prefill
    step does not finish it either); the second, untimed step does."""
    prefix = _prompt(rng, point.cached)
    if prefix:
        _run_to_end(probe, _request(f"{point.label}/prefix", prefix, 1))
    steps: list[Observation] = []
    for r in range(repeats.num_warmup + repeats.num_timed):
        rid = f"{point.label}/{r}"
        ran = _run_to_end(probe, _request(rid, prefix + _prompt(rng, point.tokens), 2))
        first = ran[0]
        if rid not in first.started or first.shape.num_decode or len(ran) != 2:
            raise RuntimeError(
                f"{point.label}: the prefill was not one step of its own (first step "
                f"{first.shape}, {len(ran)} steps in all)"
            )
        steps.append(first)
    return steps[repeats.num_warmup :]


def _summarize(label: str, kind: str, rounds: list[list[Observation]]) -> Measurement:
    """Median time over every round's timed steps. The shape is the middle round's middle step
    (decode contexts grow a token a step; rounds run the same steps)."""
    steps = [s for steps in rounds for s in steps]
    if kind == "prefill" and len({s.shape for s in steps}) > 1:
        shapes = sorted({str(s.shape) for s in steps})
        raise RuntimeError(f"{label}: repeats ran different batches: {shapes}")
    middle = rounds[len(rounds) // 2]
    times = tuple(s.time_s for s in steps)
    return Measurement(label, kind, middle[len(middle) // 2].shape, statistics.median(times), times)


def measure_grid(
    probe: Probe,
    decode: Iterable[DecodePoint],
    prefill: Iterable[PrefillPoint],
    repeats: Repeats,
    *,
    seed: int = 0,
    on_point: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Every point once per round, each round in its own seeded random order (a drift of the
    machine's load spreads over the grid instead of biasing one term); results in grid order.
    The first decode point runs once more before anything is timed, to warm the engine up.
    `on_point` hears of each point after each round."""
    rng = random.Random(seed)
    points: list[DecodePoint | PrefillPoint] = [*decode, *prefill]
    if not points:
        raise ValueError("the grid is empty")
    first_decode = next((p for p in points if isinstance(p, DecodePoint)), None)
    if first_decode is not None:
        warm_up = DecodePoint("warm-up", first_decode.prompt_lens, first_decode.spread)
        measure_decode(probe, warm_up, repeats, rng)
    rounds: list[list[list[Observation]]] = [[] for _ in points]
    for _ in range(repeats.num_rounds):
        order = list(range(len(points)))
        rng.shuffle(order)
        for index in order:
            point = points[index]
            if isinstance(point, DecodePoint):
                steps = measure_decode(probe, point, repeats, rng)
            else:
                steps = measure_prefill(probe, point, repeats, rng)
            rounds[index].append(steps)
            if on_point is not None:
                on_point(_summarize(point.label, _kind(point), [steps]))
    return [_summarize(p.label, _kind(p), r) for p, r in zip(points, rounds, strict=True)]


def _kind(point: DecodePoint | PrefillPoint) -> str:
    return "decode" if isinstance(point, DecodePoint) else "prefill"
