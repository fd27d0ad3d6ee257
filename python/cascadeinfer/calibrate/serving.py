"""Measures what a running worker daemon adds to every engine step, and adds it to a profile.

`cascade calibrate --engine` times the bare engine in a process with nothing else in it. A
worker daemon runs the same engine beside gRPC, asyncio and the step feed; their Python shares
the GIL with the engine's, and the loop spends time between steps handing each report over. On
the tiny CPU model that made a decode step 1.2-1.4 ms in the daemon against 0.95 ms bare
(docs/evaluation.md, "Simulator validation"), and the simulator, stepping on the bare profile,
predicted latencies a third too short.

This drives decode batches of a few sizes on an idle worker through its own gRPC API, reads the
step feed (`StreamSteps`), and takes the step *cadence* (time between consecutive step updates,
over a run of steps that each held only the batch's decodes) against the base profile's
prediction for the batches those steps held. The differences, fitted as `a + b * batch size`,
are the daemon's overhead; `serving_profile` adds them to `step_overhead_s` and
`per_sequence_s`. Everything else in the profile stays as the base had it.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from cascadeinfer import _core
from cascadeinfer.proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc

DEFAULT_BATCH_SIZES = (1, 4, 16)
DEFAULT_ROUNDS = 3
DEFAULT_DECODE_TOKENS = 128
PROMPT_LEN = 64
MIN_RUN_STEPS = 8
"""A round whose longest run of clean decode steps is shorter than this is not used."""


@dataclass(frozen=True)
class FeedStep:
    """One step update as the client saw it."""

    received_s: float
    step_index: int
    engine_step_s: float
    num_running: int
    num_waiting: int
    contexts: tuple[int, ...]
    is_decode_only: bool
    """Every listed request produced tokens after its first (no prefill in the step), the same
    number each."""
    num_steps: int = 1
    """Engine steps the update covers: the tokens each request got in it. A worker merges the
    steps a feed's reader has not taken yet into one update (worker/feed.py), so a reader
    that falls behind for a moment sees one update for several steps."""


@dataclass(frozen=True)
class RoundResult:
    """One batch of `batch_size` requests decoding together."""

    batch_size: int
    num_steps: int
    cadence_s: float
    """Mean time from one step update to the next over the run."""
    engine_step_s: float
    """Mean of the worker's own timer of the engine step over the same steps."""
    predicted_s: float
    """Mean of the base profile's step time for the batches those steps held."""

    @property
    def overhead_s(self) -> float:
        return self.cadence_s - self.predicted_s


@dataclass(frozen=True)
class ServingOverhead:
    per_step_s: float
    per_sequence_s: float
    rounds: list[RoundResult]

    def by_batch_size(self) -> dict[int, list[RoundResult]]:
        out: dict[int, list[RoundResult]] = {}
        for r in self.rounds:
            out.setdefault(r.batch_size, []).append(r)
        return out


def to_feed_step(update: worker_pb2.StepUpdate, received_s: float) -> FeedStep:
    requests = update.requests
    return FeedStep(
        received_s=received_s,
        step_index=update.step_index,
        engine_step_s=update.step_time_s,
        num_running=update.num_running,
        num_waiting=update.num_waiting,
        contexts=tuple(r.context_len for r in requests),
        is_decode_only=bool(requests)
        and all(r.tokens.first_index > 0 for r in requests)
        and len({len(r.tokens.token_ids) for r in requests}) == 1,
        num_steps=len(requests[0].tokens.token_ids) if requests else 0,
    )


def longest_clean_run(steps: Sequence[FeedStep], batch_size: int) -> list[FeedStep]:
    """The longest run of consecutive updates that each held exactly the batch's `batch_size`
    decodes, nothing waiting, and covered every step since the update before them (one, or
    several merged). The first update of a run only marks the start: its own interval may
    include a prefill."""
    best: list[FeedStep] = []
    run: list[FeedStep] = []
    for prev, step in itertools.pairwise(steps):
        clean = (
            step.num_steps >= 1
            and step.step_index == prev.step_index + step.num_steps
            and step.is_decode_only
            and step.num_waiting == 0
            and step.num_running == batch_size
            and len(step.contexts) == batch_size
        )
        if clean:
            run = run or [prev]
            run.append(step)
            if _steps_timed(run) > _steps_timed(best):
                best = list(run)
        else:
            run = []
    return best


def _steps_timed(run: Sequence[FeedStep]) -> int:
    """Engine steps a run times: those its updates after the first cover."""
    return sum(s.num_steps for s in run[1:])


def summarize_round(
    steps: Sequence[FeedStep], batch_size: int, profile: _core.CostProfile
) -> RoundResult | None:
    run = longest_clean_run(steps, batch_size)
    timed = run[1:]
    if _steps_timed(run) < MIN_RUN_STEPS:
        return None
    # A merged update holds its last step's contexts and engine time; it stands for each of
    # the steps it covers.
    weights = [s.num_steps for s in timed]
    num_steps = sum(weights)
    predicted = statistics.fmean(
        [profile.step_time(len(s.contexts), sum(s.contexts), max(s.contexts)) for s in timed],
        weights,
    )
    return RoundResult(
        batch_size=batch_size,
        num_steps=num_steps,
        cadence_s=(run[-1].received_s - run[0].received_s) / num_steps,
        engine_step_s=statistics.fmean([s.engine_step_s for s in timed], weights),
        predicted_s=predicted,
    )


def fit_overhead(rounds: Iterable[RoundResult]) -> tuple[float, float]:
    """(per step, per sequence): least squares of `a + b * n` through the median overhead of each
    batch size; with one batch size, all of it is per step."""
    by_size: dict[int, list[float]] = {}
    for r in rounds:
        by_size.setdefault(r.batch_size, []).append(r.overhead_s)
    if not by_size:
        raise RuntimeError("no round produced a clean run of decode steps")
    xs = sorted(by_size)
    ys = [statistics.median(by_size[x]) for x in xs]
    if len(xs) == 1:
        return ys[0], 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


class _Feed:
    """Records the worker's step feed on a thread, stamped on arrival."""

    def __init__(self, stub: worker_pb2_grpc.WorkerServiceStub) -> None:
        self._call = stub.StreamSteps(worker_pb2.StreamStepsRequest())
        self._lock = threading.Lock()
        self._steps: list[FeedStep] = []
        self.busy_at_start: int | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, name="step-feed", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the worker's step feed sent nothing in 30 s")
        if self.error is not None:
            raise self.error

    def _read(self) -> None:
        try:
            for i, update in enumerate(self._call):
                if i == 0:
                    # The first message is a snapshot of what the worker holds.
                    self.busy_at_start = len(update.requests)
                    self._started.set()
                    continue
                with self._lock:
                    self._steps.append(to_feed_step(update, time.perf_counter()))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e
        finally:
            self._started.set()

    def take(self) -> list[FeedStep]:
        with self._lock:
            steps, self._steps = self._steps, []
        return steps

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=10)


def _generate(
    stub: worker_pb2_grpc.WorkerServiceStub, request_id: str, prompt: list[int], tokens: int
) -> int:
    request = worker_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True),
    )
    return sum(len(r.tokens.token_ids) for r in stub.Generate(request, timeout=600))


def measure_serving_overhead(
    stub: worker_pb2_grpc.WorkerServiceStub,
    profile: _core.CostProfile,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    rounds: int = DEFAULT_ROUNDS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    on_round: Callable[[RoundResult], None] | None = None,
) -> ServingOverhead:
    """Runs `rounds` batches of each size on the worker behind `stub` (it must be idle) and fits
    the overhead against `profile`. Batch sizes above the profile's `max_num_seqs` are skipped."""
    max_num_seqs = int(json.loads(profile.to_json())["max_num_seqs"])
    sizes = [n for n in batch_sizes if 0 < n <= max_num_seqs]
    if not sizes:
        raise ValueError(f"no batch size in {list(batch_sizes)} fits max_num_seqs")
    feed = _Feed(stub)
    try:
        if feed.busy_at_start:
            raise RuntimeError(
                f"the worker holds {feed.busy_at_start} request(s): calibrate on an idle worker"
            )
        results: list[RoundResult] = []
        stamp = time.strftime("%H%M%S")
        with ThreadPoolExecutor(max_workers=max(sizes)) as pool:
            for rnd in range(rounds):
                for n in sizes:
                    feed.take()
                    prompts = [
                        [(17 * k + 31 * i + 7 * rnd) % 250 + 1 for k in range(PROMPT_LEN)]
                        for i in range(n)
                    ]
                    ids = [f"calibrate-serving-{stamp}-{rnd}-{n}-{i}" for i in range(n)]
                    futures = [
                        pool.submit(_generate, stub, rid, p, decode_tokens)
                        for rid, p in zip(ids, prompts, strict=True)
                    ]
                    for f in futures:
                        f.result()
                    time.sleep(0.05)  # the last step's update may trail the last token
                    if feed.error is not None:
                        raise feed.error
                    result = summarize_round(feed.take(), n, profile)
                    if result is not None:
                        results.append(result)
                        if on_round is not None:
                            on_round(result)
    finally:
        feed.close()
    per_step, per_sequence = fit_overhead(results)
    return ServingOverhead(per_step, per_sequence, results)


def serving_profile(
    base_doc: dict[str, Any], overhead: ServingOverhead, *, name: str, provenance: str
) -> tuple[dict[str, Any], list[str]]:
    """The base profile with the daemon's overhead added, and notes on what was clamped. A
    negative correction (the base profile was slower than this worker) is applied too, but no
    term goes below zero."""
    doc = dict(base_doc)
    notes: list[str] = []
    for field, add in (
        ("step_overhead_s", overhead.per_step_s),
        ("per_sequence_s", overhead.per_sequence_s),
    ):
        value = float(doc[field]) + add
        if value < 0:
            notes.append(f"{field} {doc[field]:.4g} {add:+.4g} s clamped to 0")
            value = 0.0
        doc[field] = value
    doc["name"] = name
    extra = "".join(f" Note: {n}." for n in notes)
    doc["description"] = (
        f"{base_doc.get('description', '').rstrip()} Serving overhead added: {provenance}; "
        f"{overhead.per_step_s * 1e3:+.4f} ms per step and "
        f"{overhead.per_sequence_s * 1e6:+.3f} us per sequence.{extra}"
    )
    return doc, notes
