"""Stage planning from names or files: what `cascade plan` and the scheduler service call."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cascadeinfer import _core, workloads
from cascadeinfer.config import CascadeConfig
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.stage_count import (
    OBJECTIVES,
    PRESET_SELECTION_SEEDS,
    SELECTION_SEED_OFFSET,
    SELECTION_SEEDS,
    Candidate,
    Conversation,
    choose_layout,
    conversation_trace,
    default_selection_requests,
    gaps_cv,
    selection_shape,
    selection_trace,
)
from cascadeinfer.traces import (
    TraceEntry,
    TraceRequest,
    arrival_rate,
    read_trace,
    with_lengths,
)

DEFAULT_UTILIZATION = 0.6
"""With no rate given, plan for this share of the fleet's estimated capacity."""
ESTIMATE_BACKOFF = 0.7
"""Factor an estimated default rate shrinks by while the partitioner finds it infeasible."""
ESTIMATE_BACKOFF_TRIES = 12

MAX_INSTANCES = 4096
"""The largest fleet planned for (`cascade plan --instances`, a scheduler's `min_workers`):
planning and simulating a fleet take time and memory that grow with it, 512 instances plan in
about 10 s on 2 cores (docs/benchmarks.md, "Planning time")."""

PRESET_SAMPLES = 20_000


def load_profile(name_or_path: str) -> _core.CostProfile:
    """A built-in profile by name, or a JSON profile file."""
    if name_or_path in _core.CostProfile.builtin_names():
        return _core.CostProfile.builtin(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(_core.CostProfile.builtin_names())
        raise ValueError(f"profile {name_or_path!r} is neither a built-in ({known}) nor a file")
    return profile_from_json(path.read_text(encoding="utf-8"))


def profile_from_json(text: str) -> _core.CostProfile:
    """Parses a profile. JSON proper has no NaN or Infinity, but Python writes them; name the
    field holding one instead of failing on the token."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ValueError("profile: JSON nested too deeply") from None
    if isinstance(doc, dict):
        for field, value in doc.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"invalid {field} = {value}: must be finite")
    return _core.CostProfile.from_json(text)


def builtin_profile_path(name: str) -> Path:
    return Path(str(resources.files("cascadeinfer.profiles") / f"{name}.json"))


@dataclass(frozen=True)
class Requests:
    """Request lengths to plan for, clipped to what the model can serve."""

    prompt_lens: list[int]
    output_lens: list[int]
    rate: float | None
    """A trace's arrival rate (`math.inf` when its requests all arrive at once; None for a
    preset)."""
    num_dropped: int
    """Requests whose prompt alone reaches the model's max length: they cannot be served."""
    num_truncated: int
    """Requests whose output was cut to fit the model's max length."""
    arrival_cv: float | None = None
    """Coefficient of variation of a trace's inter-arrival gaps (None for a preset)."""
    num_trace_requests: int | None = None
    """How many requests a trace holds (None for a preset)."""
    arrival_gaps: list[float] | None = None
    """A trace's gap before each request of `prompt_lens` (None for a preset): the selection
    traces resample requests with their gaps, so bursts keep the length they had and the
    requests that came in them."""
    conversations: list[Conversation] | None = None
    """A trace's sessions and lone requests in order of their first arrival, lengths fitted as
    the others (None for a preset or a trace without sessions): the selection traces redraw
    them whole (`stage_count.conversation_trace`)."""


def clamp_lengths(prompt_len: int, output_len: int, max_len: int) -> tuple[int, int]:
    """Fits one request into `max_len` tokens of context: the prompt first, then the output
    (at least one token). The benchmarks run presets and traces through this."""
    prompt_len = min(prompt_len, max_len - 1)
    return prompt_len, max(1, min(output_len, max_len - prompt_len))


def load_requests(
    workload: str, max_len: int, seed: int = 0, *, clamp_prompts: bool = False
) -> Requests:
    """A workload's samples (`cascadeinfer.workloads`), or a JSONL trace's requests (with its
    arrival rate). A prompt the model cannot hold is dropped (a live scheduler refuses it), or
    with `clamp_prompts` cut to fit as the benchmarks cut it, so a plan sees the lengths a
    benchmark runs."""
    conversations = None
    if workloads.is_workload(workload):
        prompts, outputs = workloads.get(workload).sample(PRESET_SAMPLES, seed)
        rate, cv, num_trace, gaps = None, None, None, None
    elif Path(workload).is_file():
        trace = read_trace(workload)
        prompts = [r.prompt_len for r in trace]
        outputs = [r.output_len for r in trace]
        rate = arrival_rate(trace)
        arrivals = [r.arrival_s for r in trace]  # read_trace sorts them
        cv = gaps_cv(arrivals)
        gaps = _gaps_before(arrivals)
        num_trace = len(trace)
        if any(r.session_id is not None for r in trace):
            conversations = _conversations(trace, max_len, clamp_prompts)
    else:
        raise workloads.not_found(workload)
    kept_p, kept_o, kept_gaps, dropped, truncated = [], [], [], 0, 0
    for k, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        if p >= max_len and clamp_prompts:
            truncated += 1
            p, o = clamp_lengths(p, o, max_len)
        elif p >= max_len:
            dropped += 1
            if gaps is not None and k + 1 < len(gaps):
                gaps[k + 1] += gaps[k]  # the next request's gap is from the last one kept
            continue
        if gaps is not None:
            kept_gaps.append(gaps[k])
        if p + o > max_len:
            truncated += 1
            o = max_len - p
        kept_p.append(p)
        kept_o.append(o)
    if not kept_p:
        raise ValueError(f"every request of {workload!r} is longer than max_len {max_len}")
    if gaps is not None:
        gaps = kept_gaps
    return Requests(kept_p, kept_o, rate, dropped, truncated, cv, num_trace, gaps, conversations)


def _gaps_before(arrivals: Sequence[float]) -> list[float]:
    """Each request's time since the one before it (sorted `arrivals`); the first request,
    which has none, gets the mean gap."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    mean = (arrivals[-1] - arrivals[0]) / len(gaps) if gaps else 0.0
    return [mean, *gaps]


def _conversations(
    trace: Sequence[TraceRequest], max_len: int, clamp_prompts: bool
) -> list[Conversation] | None:
    """`trace`'s sessions and lone requests (`Requests.conversations`), lengths fitted as
    `load_requests` fits them; None when no request is left."""
    grouped: dict[tuple[bool, object], list[TraceRequest]] = {}
    for k, r in enumerate(trace):
        key = (True, r.session_id) if r.session_id is not None else (False, k)
        grouped.setdefault(key, []).append(r)
    conversations = []
    for (is_session, _), requests in grouped.items():
        start = requests[0].arrival_s
        kept = []
        for r in requests:
            if r.prompt_len >= max_len and not clamp_prompts:
                continue  # dropped, as load_requests drops it
            prompt, output = clamp_lengths(r.prompt_len, r.output_len, max_len)
            prefix = min(r.prefix_len, prompt - 1)
            kept.append((r.arrival_s - start, prompt, output, r.turn, prefix))
        if kept:
            conversations.append(Conversation(start, tuple(kept), is_session))
    return conversations or None


def selection_traces(
    workload: str,
    requests: Requests,
    rate: float,
    seed: int,
    arrival_cv: float,
    num_requests: int,
    max_len: int,
    clamp_prompts: bool = False,
    gaps: Sequence[float] | None = None,
    num_traces: int | None = None,
) -> list[list[TraceEntry]]:
    """The traces every layout candidate is simulated on, with seeds from `seed` +
    SELECTION_SEED_OFFSET. A preset draws PRESET_SELECTION_SEEDS of them as it draws any trace
    of that length (independent realizations: a heavy-tailed preset's short trace can be far
    lighter or heavier than its long-run mix, and the layout must hold on the draw that
    comes); a trace file has one realization, so SELECTION_SEEDS block resamples of its
    requests, each with its gap before it, `gaps` (`stage_count.selection_trace`; Gamma
    gaps of `arrival_cv` without them); `num_traces` of them instead where given
    (`stage_count.selection_shape`). A trace with sessions has its conversations redrawn whole
    instead (`stage_count.conversation_trace`), so the prefix caches its turns reuse are
    simulated. Lengths are fitted as `load_requests` fits them."""
    if requests.conversations and requests.rate and math.isfinite(requests.rate):
        return [
            conversation_trace(
                requests.conversations,
                requests.rate / rate,
                seed + k,
                num_requests,
                None if gaps else arrival_cv,
            )
            for k in range(num_traces or SELECTION_SEEDS)
        ]
    if not workloads.is_workload(workload):
        return [
            selection_trace(
                requests.prompt_lens,
                requests.output_lens,
                rate,
                seed + k,
                arrival_cv,
                num_requests,
                gaps,
            )
            for k in range(num_traces or SELECTION_SEEDS)
        ]
    preset = workloads.get(workload)
    traces = []
    for k in range(num_traces or PRESET_SELECTION_SEEDS):
        drawn = preset.trace(
            num_requests, rate, "gamma", arrival_cv, seed + k + SELECTION_SEED_OFFSET
        )
        fitted = []
        for entry in drawn:
            prompt, output = entry[1], entry[2]
            if prompt >= max_len and not clamp_prompts:
                continue  # dropped, as the planning samples drop it
            fitted.append(with_lengths(entry, *clamp_lengths(prompt, output, max_len)))
        traces.append(fitted)
    return traces


@dataclass(frozen=True)
class PlanResult:
    plan: _core.StagePlan
    workload: _core.Workload
    rate: float
    solve_ms: float
    """Partitioning and, with a stage count chosen by simulation, the candidates' simulations."""
    requests: Requests
    candidates: list[Candidate] = field(default_factory=list)
    """Every layout simulated (stage_count.py); empty when the layout was not chosen so."""
    config: CascadeConfig = field(default_factory=CascadeConfig)
    """The policy configuration to run the plan with (the chosen candidate's)."""


def fleet_capacity(
    requests: Requests, grid: _core.BucketGrid, profile: _core.CostProfile, num_instances: int
) -> float:
    """Arrivals per second of these lengths that keep every instance busy all the time: an
    upper bound (queueing and stalls make what the fleet carries lower)."""
    unit = _core.Workload.from_samples(grid, requests.prompt_lens, requests.output_lens, 1.0)
    return num_instances / unit.work_per_second(profile)


def plan_stages(
    *,
    num_instances: int,
    workload: str,
    profile: _core.CostProfile,
    rate: float | None = None,
    num_buckets: int = 128,
    max_stages: int | None = None,
    seed: int = 0,
    max_len: int | None = None,
    back_off_when_infeasible: bool = False,
    clamp_prompts: bool = False,
    choose_count_by_simulation: bool = True,
    arrival_cv: float | None = None,
    objective: str = "mean",
    horizon_requests: int | None = None,
    config: CascadeConfig | None = None,
    goodput_slo: GoodputSlo | None = None,
) -> PlanResult:
    """Plans stages for a preset or trace. The rate is, in order: `rate`, the trace's own,
    or DEFAULT_UTILIZATION of the fleet's estimated capacity for this workload; a trace whose
    requests all arrive at once (an offline batch) loads the fleet fully, so the partitioner
    plans for its capacity and the candidates are simulated on batches arriving at once too.
    `max_len` (default: the profile's max_model_len) is the longest context the fleet serves;
    `clamp_prompts` as in `load_requests`. `choose_count_by_simulation`: the number of stages
    and whether to split at all are chosen by simulating the candidates against one stage
    (stage_count.py), not the partitioner's own pick. `arrival_cv`: the burstiness of the
    traffic to plan for (the coefficient of variation of inter-arrival gaps; default: a trace's
    own, else 1.0, Poisson). `objective`: what the selection optimizes, "mean" or "p99"
    end-to-end latency, or "goodput" against `goodput_slo` (default GoodputSlo())
    (stage_count.OBJECTIVES). `horizon_requests`: how many requests the
    traffic to plan for holds (a benchmark's run; default: a trace's own count but at least
    `default_selection_requests`, else that); the candidates' simulations run that many, up to
    a bound that grows with the fleet, on more selection traces when fewer than
    SELECTION_REQUESTS (`stage_count.selection_shape`). `config`: the
    cascade settings the candidates run with (default CascadeConfig())."""
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be finite and > 0, got {rate}")
    if arrival_cv is not None and not (math.isfinite(arrival_cv) and arrival_cv > 0):
        # Checked here: 0 would read as "not given" below and plan for Poisson instead.
        raise ValueError(f"arrival_cv must be finite and > 0, got {arrival_cv}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: known {', '.join(OBJECTIVES)}")
    max_len = max_len or profile.max_model_len
    grid = _core.BucketGrid.geometric(max_len, num_buckets)
    requests = load_requests(workload, max_len, seed, clamp_prompts=clamp_prompts)
    chosen = rate or requests.rate
    is_estimated = chosen is None or math.isinf(chosen)

    if chosen is None:
        chosen = DEFAULT_UTILIZATION * fleet_capacity(requests, grid, profile, num_instances)
    elif math.isinf(chosen):
        chosen = fleet_capacity(requests, grid, profile, num_instances)
    elif back_off_when_infeasible:
        # Past capacity (a benchmark's rate search), back off from the capacity rather than
        # from the asked rate, so the tries below reach a rate the fleet can carry.
        chosen = min(chosen, fleet_capacity(requests, grid, profile, num_instances))
    start = time.perf_counter()
    for attempt in range(ESTIMATE_BACKOFF_TRIES):
        summary = _core.Workload.from_samples(
            grid, requests.prompt_lens, requests.output_lens, chosen
        )
        try:
            plan = _core.partition(summary, profile, num_instances, max_stages)
            break
        except _core.InfeasibleError:
            # The capacity estimate ignores queueing and stalls; the partitioner does not.
            # An estimated rate backs off until the fleet can carry it; a given one is an error.
            if (
                not (is_estimated or back_off_when_infeasible)
                or attempt == ESTIMATE_BACKOFF_TRIES - 1
            ):
                raise
            chosen *= ESTIMATE_BACKOFF
    candidates: list[Candidate] = []
    config = config or CascadeConfig()
    if choose_count_by_simulation:
        # Also where the partitioner's own plan is one stage: its objective is the mean of a
        # steady state, and the selection's candidates are more than splits. Past capacity,
        # prompts of 40-120K tokens ran 13-16% slower on mean and 13-14% on p99 than Llumnix's
        # admission, which the one-stage candidates include, and short of it a split the
        # partitioner did not propose ran 26% faster than one stage (docs/benchmarks.md,
        # "A selection for every plan").
        #
        # At the rate asked for even when the partitioner had to plan for less (benchmarks
        # past saturation): the simulation judges the plans under the traffic they will get.
        target = rate or requests.rate or chosen
        cv = arrival_cv or requests.arrival_cv or 1.0
        # A run's own length where one is planned for (a benchmark); a service planned from a
        # trace file serves far more than the file holds, so never less than a full-length
        # selection trace there.
        n, num_traces = selection_shape(
            horizon_requests
            or max(requests.num_trace_requests or 0, default_selection_requests(num_instances)),
            PRESET_SELECTION_SEEDS if workloads.is_workload(workload) else SELECTION_SEEDS,
            num_instances,
        )
        # A trace's own gaps unless a burstiness was asked for.
        gaps = requests.arrival_gaps if arrival_cv is None else None
        traces = selection_traces(
            workload, requests, target, seed, cv, n, max_len, clamp_prompts, gaps, num_traces
        )
        chosen_candidate, candidates = choose_layout(
            plan,
            summary,
            profile,
            num_instances,
            traces,
            config,
            objective=objective,
            goodput_slo=goodput_slo,
        )
        plan, config = chosen_candidate.plan, chosen_candidate.config
    solve_ms = (time.perf_counter() - start) * 1000.0
    return PlanResult(plan, summary, chosen, solve_ms, requests, candidates, config)
