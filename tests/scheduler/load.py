"""Closed-loop client load on a scheduler, and the invariant checker faults are judged by.

Each client thread sends requests one after another (distinct prompts, lengths spread over
the stage bounds) and records what its stream delivered, by output index. The checker then
holds every request to the contract a client relies on: a stream that was accepted ends with a
finish reason, its tokens carry indices 0..n-1 with no gap and no duplicate, and their values
equal the same request run unmoved. The sim engine's tokens depend only on the prompt and the
output index, so the unmoved reference is the sim engine itself, run here in-process.

A request may instead fail with a clear status only where the run says so (the window of a
scheduler restart); any other failure, and any stream that hangs to its deadline, is a lost
request.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.worker.engine import EngineRequest, SamplingSpec
from cascadeinfer.worker.engines.sim_engine import SimEngine, SimEngineConfig

STREAM_DEADLINE_S = 90.0
"""A client stream still open after this is a hang (the longest request runs a few seconds)."""


@dataclass
class Outcome:
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    started_at: float
    ended_at: float = 0.0
    tokens: dict[int, int] = field(default_factory=dict)
    num_duplicates: int = 0
    num_out_of_order: int = 0
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
    error: grpc.StatusCode | None = None
    error_details: str = ""
    num_migrations: int = 0
    max_gap_s: float = 0.0
    """The longest wait between two messages of the stream."""


@dataclass(frozen=True)
class Window:
    """A span of the run in which a request may end with one of `codes` instead of finishing
    (requests in flight at a scheduler crash, or sent while it is down)."""

    started_at: float
    ended_at: float
    codes: frozenset[grpc.StatusCode]


@dataclass
class Verdict:
    num_requests: int = 0
    num_completed: int = 0
    num_failed_clearly: int = 0
    """Ended with an allowed status inside an allowed window..."""
    num_failed_with_tokens: int = 0
    """...of which had tokens already (accepted and running when the scheduler died)."""
    num_tokens: int = 0
    num_migrations: int = 0
    max_gap_s: float = 0.0
    """The longest any stream waited between two messages (a cut link shows here)."""
    lost: list[str] = field(default_factory=list)
    """One line per request that broke the contract."""


class Load:
    """`concurrency` client threads against `address` until `stop()`."""

    def __init__(
        self,
        address: str,
        concurrency: int,
        seed: int = 0,
        prompt_lens: tuple[int, int] = (20, 200),
        max_tokens: tuple[int, int] = (60, 300),
        metadata: tuple[tuple[str, str], ...] = (),
        stream_deadline_s: float = STREAM_DEADLINE_S,
        vocab_size: int = 30_000,
    ) -> None:
        """`vocab_size`: prompt token ids are drawn below it (the sim engine's vocabulary by
        default; 1,024 for the built-in tiny model under vLLM)."""
        self.address = address
        self._vocab_size = vocab_size
        self.stream_deadline_s = stream_deadline_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._metadata = metadata
        self._prompt_lens = prompt_lens
        self._max_tokens = max_tokens
        self._threads = [
            threading.Thread(target=self._client, args=(k, seed), daemon=True)
            for k in range(concurrency)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        """Lets every stream in flight end (or hit its deadline) and returns all outcomes."""
        self._stop.set()
        for t in self._threads:
            t.join(self.stream_deadline_s + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread never returned"
        return list(self.outcomes)

    def num_completed(self) -> int:
        with self._lock:
            return sum(o.finish == common_pb2.FINISH_REASON_LENGTH for o in self.outcomes)

    def _client(self, k: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + k)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(self.address))
        n = 0
        while not self._stop.is_set():
            prompt = tuple(
                rng.randrange(1, self._vocab_size) for _ in range(rng.randint(*self._prompt_lens))
            )
            outcome = Outcome(
                f"load-{seed}-{k}-{n}", prompt, rng.randint(*self._max_tokens), time.monotonic()
            )
            n += 1
            with self._lock:
                self.outcomes.append(outcome)
            self._one(stub, outcome)
            if outcome.error is not None:
                time.sleep(0.5)  # the scheduler is down or refusing: do not spin

    def _one(self, stub: scheduler_pb2_grpc.SchedulerServiceStub, o: Outcome) -> None:
        request = scheduler_pb2.ClientGenerateRequest(
            request_id=o.request_id,
            prompt_token_ids=scheduler_pb2.TokenIds(ids=o.prompt),
            sampling=common_pb2.SamplingParams(max_tokens=o.max_tokens, ignore_eos=True),
        )
        last = time.monotonic()
        try:
            for r in stub.Generate(
                request, timeout=self.stream_deadline_s, metadata=self._metadata
            ):
                now = time.monotonic()
                o.max_gap_s, last = max(o.max_gap_s, now - last), now
                if r.tokens.first_index != len(o.tokens):
                    o.num_out_of_order += 1
                for j, token in enumerate(r.tokens.token_ids):
                    index = r.tokens.first_index + j
                    if index in o.tokens:
                        o.num_duplicates += 1
                    o.tokens[index] = token
                if r.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    o.finish = r.finish_reason
                    o.num_migrations = r.timings.num_migrations
        except grpc.RpcError as e:
            o.error, o.error_details = e.code(), e.details() or ""
        o.ended_at = time.monotonic()


def reference_tokens(outcomes: list[Outcome]) -> dict[str, list[int]]:
    """Each request's tokens served by one sim engine (the workers' default vocabulary) that
    never moves it."""
    engine = SimEngine(SimEngineConfig(time_scale=0.0, num_blocks=1 << 20, max_model_len=1 << 16))
    out: dict[str, list[int]] = {}
    for start in range(0, len(outcomes), 64):
        for o in outcomes[start : start + 64]:
            sampling = SamplingSpec(max_tokens=o.max_tokens, ignore_eos=True)
            engine.add_request(EngineRequest(o.request_id, o.prompt, sampling))
            out[o.request_id] = []
        while engine.has_unfinished():
            for p in engine.step().progress:
                out[p.request_id].extend(p.new_token_ids)
    return out


def check(
    outcomes: list[Outcome], windows: list[Window] | None = None, exact_tokens: bool = True
) -> Verdict:
    """Holds every request to the contract (see the module docstring). `exact_tokens=False`
    (workers that are not the sim engine) asks for every token index once and in order, not
    for the sim engine's token values."""
    references = (
        reference_tokens(outcomes) if exact_tokens else {o.request_id: None for o in outcomes}
    )
    windows = windows or []
    v = Verdict(num_requests=len(outcomes))
    for o in outcomes:
        v.num_tokens += len(o.tokens)
        v.num_migrations += o.num_migrations
        v.max_gap_s = max(v.max_gap_s, o.max_gap_s)
        problem = _problem(o, references[o.request_id], windows)
        if problem is None:
            if o.error is None:
                v.num_completed += 1
            else:
                v.num_failed_clearly += 1
                v.num_failed_with_tokens += bool(o.tokens)
        else:
            v.lost.append(f"{o.request_id}: {problem}")
    return v


def _problem(o: Outcome, reference: list[int] | None, windows: list[Window]) -> str | None:
    if o.num_duplicates or o.num_out_of_order:
        return f"{o.num_duplicates} duplicates, {o.num_out_of_order} out of order"
    if o.error is not None:
        if o.error == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "hung until its deadline"
        allowed = any(
            o.error in w.codes and o.started_at <= w.ended_at and o.ended_at >= w.started_at
            for w in windows
        )
        return None if allowed else f"failed {o.error.name}: {o.error_details}"
    if o.finish != common_pb2.FINISH_REASON_LENGTH:
        return f"ended with finish reason {o.finish}, not LENGTH"
    if sorted(o.tokens) != list(range(len(o.tokens))):
        return "gap in the token indices"
    if reference is None:
        return None if len(o.tokens) == o.max_tokens else f"{len(o.tokens)} of {o.max_tokens}"
    got = [o.tokens[i] for i in range(len(o.tokens))]
    if got != reference:
        first = next(
            (i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b), None
        )
        return f"{len(got)} tokens of {len(reference)}, first difference at {first}"
    return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
