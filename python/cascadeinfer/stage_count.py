"""Chooses the layout to run by simulating candidates against the one-stage layout.

The partitioner's objective is an analytic queueing model (docs/design/partitioner.md). It
prices a stage's padding at the stage's longest context and a prefill chunk at an average
step, and it sees neither bursts nor the KV a stage needs for the contexts that grow into it,
so it misjudges the number of stages and, on some traffic, whether splitting pays at all. The
cluster simulator in the core runs the very policy the scheduler will run, so each candidate
runs there on traffic drawn like the observed one:

- a preset's own draws of the run's length (`PRESET_SELECTION_SEEDS` of them), or a trace
  file's requests resampled in blocks of consecutive ones, so runs of long requests stay
  together (`SELECTION_SEEDS` resamples; `planning.selection_traces` picks); arrivals at the
  planned rate, for a trace file its own gaps resampled in long blocks (bursts that last
  minutes included), for a preset Gamma with the coefficient of variation asked for; on seeds
  of their own (never the benchmark's trace); each as long as the traffic planned for, more of
  them when that is short (`selection_shape`);
- the policy as it will run (refinement and balancing on).

The candidates are the one-stage layout (least-load admission exactly: the no-regret
fallback), the one-stage layout with balancing moves, and the partitioner's best plan for
several stage counts. One stage is balanced only where that simulates better on the mean, and
on mean and p99 together (`MIN_BALANCE_GAIN`), or far better on the p99 at the same mean
(`STEADY_TAIL_GAIN`, `LARGE_TAIL_GAIN`). A split is chosen only when it beats plain one
stage on the simulated mean by `MIN_GAIN`, its simulated p99 is not above plain's
(`MAX_P99_SLACK`; a p99 of 2,000 requests is the 20th worst, a noisier figure than the mean)
and the two ratios' average shows the same gain (`MIN_GAIN` again), and beats the one-stage
form kept by `MIN_GAIN` on the mean and on the average too, all as the mean over the selection
traces of its per-trace ratio; or, short of those margins, it is not behind either on
either figure on any selection trace and ahead on average (`STEADY_SPLIT_GAIN`); of those,
the lowest average wins (`pick`); otherwise the fleet runs as one stage. Where that layout
trails a baseline's form in selection, the one of least regret runs (`_least_regret`); where
it trails the best candidate's goodput by more than `GOODPUT_GUARD`, the one of least regret
among those near the best goodput (`_goodput_guard`).
Boundaries within a count stay the partitioner's; instance counts are searched from the best
splits by simulation (`_search_sizes`). Runtime refinement keeps the count it is given.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from cascadeinfer import _core
from cascadeinfer.config import CascadeConfig
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.traces import TraceEntry

SELECTION_REQUESTS = 2000
"""Requests in one candidate simulation when the horizon to plan for is not known, on a fleet
of up to REFERENCE_FLEET instances (`default_selection_requests`): enough for a stable mean, a
few ms to ~0.1 s each. Also the count below which a run is short and gets more selection
traces (`selection_shape`): how noisy a trace's mean is depends on its requests, not on the
fleet."""
MAX_SELECTION_REQUESTS = 5000
"""The most requests a candidate simulation runs on a fleet of up to REFERENCE_FLEET instances.
Near saturation a queue grows over the whole run, so a selection trace shorter than the traffic
it plans for understates the overload that decides between candidates (agentic at 6 req/s: 17 s
mean in 2,000 requests, 40 s in 3,000); planning for a trace simulates as many requests as it
has, up to this (`selection_shape` scales it to larger fleets)."""
REFERENCE_FLEET = 16
"""The fleet SELECTION_REQUESTS and MAX_SELECTION_REQUESTS were measured on. A larger fleet gets
proportionally more, so a selection trace spans as many seconds of traffic at the same load:
the rate that loads a fleet grows with its size, and a count fixed at 5,000 requests spans 41 s
on 64 instances at production-mix's planned rate (123 req/s), less than its p99 request lives
(64-87 s). The
simulation then sees the fleet fill and never its steady state: on 20,000-request runs on 64
instances it kept one stage or two where the run needed more, and ran at 0.98-1.04x
least-load's mean and p99 on the production-mix and reasoning presets, against 0.69-0.78x with
20,000-request selection traces; on 20 bursty traces of that length the geometric means of
cascade over the best baseline went from 0.731 / 0.834 (mean / p99) to 0.651 / 0.770
(docs/benchmarks.md, "Selection traces as long as the fleet needs")."""
MAX_SCALED_SELECTION_REQUESTS = 20_000
"""The most requests a candidate simulation runs on any fleet, which bounds the planning time:
10-61 s on 64 instances at 20,000 requests, where 5,000 took 2-13 s (10,000 kept the gains
below 60% of capacity and lost those near it). Past
REFERENCE_FLEET * MAX_SCALED_SELECTION_REQUESTS / MAX_SELECTION_REQUESTS = 64 instances a
selection trace spans less traffic than on 16, as before this scaling."""
SELECTION_SEEDS = 6
"""Selection traces per candidate for a trace file (block resamples of its one realization);
the candidates' ratios to one stage are averaged over them. Six, not three: on 160 bursty trace
files the planner had not seen (`bench/no_regret.py`, seeds 200-203 and 300-303), three
resamples let a split through that ran at up to 1.19x the best baseline's p99; six halved the
noise of the averaged p99 ratio enough to bring the worst to 1.14x at the same geometric
means (docs/benchmarks.md, "No regret on unseen bursty traces"). Splits that trail far behind
still stop after PRUNE_AFTER traces."""
PRESET_SELECTION_SEEDS = 5
"""Selection traces per candidate for a preset (independent realizations): a heavy-tailed
preset's short traces differ far more than resamples of one trace do (3,000 requests of
sharegpt-multiturn: mean prompt 2,069 to 9,168 tokens over 12 seeds), and three draws can all
be heavy where most traces that come are light (a split chosen so ran at 1.5-2.6x)."""
MAX_SELECTION_TRACES = 30
"""The most selection traces per candidate (`selection_shape`)."""
SELECTION_BLOCK = 64
"""Consecutive planning samples drawn together: a session's turns, a burst of long documents."""
TRACE_BLOCK = 256
"""Consecutive requests of a trace file drawn together, each with the gap before it: a phase of
high rate that lasts minutes, as in Markov-modulated or diurnal traffic, stays one, with the
requests that came in it. Gamma gaps with the trace's coefficient of variation make bursts a
few requests long whatever the trace had: on production traffic whose rate switched between
1.8x and 0.2x of its mean every ~40 s they predicted splits 7% ahead of one stage that ran at
1.09-1.10x its p99 (docs/benchmarks.md, "Bursts that last minutes"). Blocks of 64 brought the
worst cell of `bench/no_regret.py` from 1.06x to 1.08x the best baseline's p99
(docs/benchmarks.md, "Requests drawn with their own gaps")."""
GAP_BLOCK = TRACE_BLOCK
"""Consecutive gaps between conversations' starts drawn together (`conversation_trace`), apart
from the conversations' own blocks. Drawing each conversation with the gap before its start,
as a trace's requests are drawn, moved `bench/session_traces.py`'s 12 cells by -0.05 to +0.10
of the best baseline's p99 (geometric means 0.767 / 0.797 against 0.759 / 0.789), so the
conversations keep the draw they had (docs/benchmarks.md, "Requests drawn with their own gaps")."""
SELECTION_SEED_OFFSET = 7919
"""The selection traces' seeds start at the planning seed plus this, so none is a benchmark's
trace drawn with the planning seed."""
STAGE_COUNTS = (2, 3, 4, 6)
"""Stage counts tried besides one stage and the partitioner's own count."""
MIN_GAIN = 0.05
"""A split must cut the simulated mean end-to-end latency by this share: the selection traces
are samples, and a split that only ties in simulation can lose on the traffic that comes."""
MAX_P99_SLACK = 0.0
"""... and keep its simulated p99 end-to-end latency within this share above one stage's. None:
a split that wins on the mean but gives back some p99 in simulation was the usual way to lose
on the tail of the traffic that came (a 5% allowance let through splits that ran at 1.04-1.19x
the best baseline's p99), and with six selection traces the averaged p99 ratio is steady
enough to hold the split to it.

The average of the mean and p99 ratios must also be `MIN_GAIN` below 1: a split that ties one
stage on the tail needs twice the gain on the mean. Splits whose simulated gain was 5-6% on the
mean and 0-1% on the p99 ran at up to 1.08x the best baseline's mean and 1.20x its p99 on the
trace itself (agent steps under minute-long bursts, Mooncake-like documents), while a split
that isolates long contexts where that pays cuts the tail as well, or the mean by far more
(docs/benchmarks.md, "A split's gain on mean and tail together")."""
MIN_BALANCE_GAIN = 0.01
"""A one-stage alternative (balanced, or run Llumnix's way) must cut the mean ratio by this
share, and the average of the mean and p99 ratios by as much. Where balancing trades mean for
tail in simulation it was seen to cost up to 9% of mean latency on the real trace; where it
gains on the p99 alone (a low load, where nothing queues and the mean moves by nothing), the
gain is the draw of a few dozen longest answers: a balanced fleet chosen so for 4% of p99 in
simulation (mean 1.000) ran at 1.05x plain one stage's p99 on the trace itself. A gain on the
mean, the figure of every request, is the sign that the instances are uneven enough for moves
to pay (docs/benchmarks.md, "Balancing only where the mean gains")."""

STEADY_SPLIT_GAIN = 0.02
"""A split short of `MIN_GAIN` is admitted too where it is not behind one stage on either
figure on any selection trace and the average of its two ratios is at least this share below 1
(`_steady_split_gain`). The margins above guard against gains the average over the resamples
shows by chance; a gain on both figures on every resample is the traffic's. On production-like
traffic at the highest load below capacity, splits 1-5% ahead on the mean and 4-12% on the p99
on every resample were turned away, and one stage ran at 1.03-1.06x Llumnix's p99
(docs/benchmarks.md, "A split ahead on every resample"). A split whose tail was behind one
stage's on a single resample, 5% ahead on the mean, ran at 1.06x / 1.17x one stage's mean and
p99 on the trace (agent steps in bursts); asking a 1% lead on every resample as well as on
average turned away more splits that won than that lost."""

KEPT_TAIL_SLACK = 0.05
"""A split's p99 ratio to the one-stage form kept is at most 1 + this. The form is the best of
three noisy simulations, so its p99 is biased low: holding splits to it exactly turned away a
split that ran at 0.81x / 0.77x least-load's mean and p99 (1.007 of a balanced form's p99 in
selection) for that form, which ran at 1.05x / 1.12x. Without a bound a split at 1.06 of it
ran at 1.28x the best baseline's p99 (docs/benchmarks.md, "A split held to the form kept's
tail")."""
KEPT_STEADY_TAIL_SLACK = 0.02
"""... and at most 1 + this where the form kept has its tail gain on every selection trace
(`_steady_tail_gain`): a gain every resample shows is the traffic's. Not 0: a split 37% ahead
on the mean at 1.004 of a balanced form's p99 ran at 0.57x the best baseline's mean where the
balanced form ran at 1.03x (docs/benchmarks.md, "Short traces")."""
STEADY_TAIL_GAIN = 0.03
"""A one-stage alternative whose mean is not above the form kept so far also replaces it when
its p99 is at least this share lower on every selection trace. A tail gain that every resample
shows is the traffic's, not one draw's: past capacity, where every policy queues and the means
move together, Llumnix's admission kept the p99 of reasoning traffic with capped answers 5-10%
lower on all six resamples at a mean within 1% and ran 7.5% lower on the trace itself, while
the low-load gains `MIN_BALANCE_GAIN` guards against had a resample going the other way
(docs/benchmarks.md, "A tail gain every resample shows")."""

LARGE_TAIL_GAIN = 0.10
"""A one-stage alternative also replaces the form kept so far when its p99 averages at least
this share lower, is not above the kept form's on any selection trace, and its mean ratio is at
most 1 + MIN_BALANCE_GAIN (`_large_tail_gain`). STEADY_TAIL_GAIN asks for a gain on every
resample, which a resample whose tail happens to tie refuses: on ShareGPT conversations at 0.3x
capacity, placing turns blind to the caches (least-load's way) kept the p99 21% lower on
average, 0.7-43% on each of six resamples, at a mean 0.7% higher, and following the caches ran at
1.47x least-load's p99 on the trace itself (docs/benchmarks.md, "A large tail gain no resample
contradicts"). The low-load gains MIN_BALANCE_GAIN guards against were a few percent."""


SIZE_SEARCH_ROUNDS = 4
"""The most instance moves the size search makes from one split (`_search_sizes`)."""
SIZE_SEARCH_STARTS = 2
"""Splits the size search starts from, the best first by `pick`'s rules (admitted first, then
the lowest score); the next only while no split is admitted. The best-scored split is not
always the one a move makes admissible (bimodal traffic below capacity: the three-stage split
scored best, the two-stage one was one move from a layout `pick` takes). Not more where one
is: searching from a second split where the first was admitted added a layout that scored
best on the selection traces by chance and ran 1.6x slower than the first chain's on the trace
(docs/benchmarks.md, "Into the layouts the pick admits")."""
SIZE_SEARCH_FINALISTS = 2
"""Neighbouring layouts of each round that run on every selection trace."""
MAX_SIZE_NEIGHBOURS = 30
"""Past this many layouts one move away (six stages), moves go to a neighbouring stage only."""
SIZE_GAIN = 0.01
"""A move between stages must cut `pick`'s score of the layout (the average of its mean and
p99 ratios to the one-stage form kept) by this much."""


PRUNE_AFTER = 2
"""Traces every candidate runs on before the splits that trail far behind are dropped."""
PRUNE_RATIO = 1.2
"""A split whose mean latency averages more than this ratio to plain one stage over the first
PRUNE_AFTER traces skips the rest: to pass MIN_GAIN it would need to beat one stage by about a
quarter on every remaining trace. Dropping biases the choice towards one stage only."""
NUM_ONE_STAGE = 3
"""One-stage candidates, first among the candidates: plain (least-load exactly), balanced,
and run Llumnix's way (`CascadeConfig.is_one_stage_kv_first`). Either of the last two replaces
the one before it only by beating it as `MIN_BALANCE_GAIN` says. Where the selection traces
carry sessions, SESSION_FORMS add one more each, after them."""
SESSION_FORMS = (("blind", False), ("blind", True), ("cache-aware", False))
"""Ways of placing a session's turns (`CascadeConfig.one_stage_turns`, with
`is_one_stage_kv_first`) tried as one-stage candidates besides cascade's own ("cheapest",
which the forms above run) where the selection traces carry sessions: blind to the caches,
least-load's way and Llumnix's (each that baseline exactly), and the cache-aware baseline's
rule. On ShareGPT conversations the blind forms kept the p99 far lower than following the
caches, and Llumnix's the lowest of all on some (docs/benchmarks.md, "Sessions in the
selection traces", "Every baseline a one-stage form")."""


@dataclass(frozen=True)
class Candidate:
    num_stages: int
    plan: _core.StagePlan
    config: CascadeConfig
    """The policy configuration the candidate ran with (and runs with when chosen)."""
    per_trace: tuple[tuple[float, float], ...]
    """(mean, p99) end-to-end latency on each selection trace, in the traces' order (NaN where
    a request did not finish): candidates are compared trace by trace. A split dropped after
    PRUNE_AFTER traces holds only those."""
    is_resized: bool = False
    """Made by the size search (`_search_sizes`): another candidate's stage ranges on other
    instance counts."""
    goodput_per_trace: tuple[float, ...] = ()
    """The share of requests meeting the goodput SLO on each selection trace run, in the
    traces' order (NaN where a request did not finish); empty where not measured."""

    @property
    def simulated_mean_e2e_s(self) -> float:
        """Mean end-to-end latency averaged over the traces run; NaN when a request did not
        finish in some simulation (the plan cannot carry the rate)."""
        return sum(m for m, _ in self.per_trace) / len(self.per_trace)

    @property
    def simulated_p99_e2e_s(self) -> float:
        return sum(p for _, p in self.per_trace) / len(self.per_trace)

    @property
    def simulated_goodput(self) -> float:
        """Goodput averaged over the traces run; NaN where not measured or a request did not
        finish."""
        if not self.goodput_per_trace:
            return math.nan
        return sum(self.goodput_per_trace) / len(self.goodput_per_trace)

    def is_pruned(self, num_traces: int) -> bool:
        """Whether this candidate was dropped before running on all `num_traces` traces."""
        return len(self.per_trace) < num_traces


def default_selection_requests(num_instances: int) -> int:
    """Requests in one selection trace when the traffic to plan for has no known length (a
    service planned from a preset): SELECTION_REQUESTS, scaled up past REFERENCE_FLEET
    instances as `selection_shape` scales its bound."""
    return _scaled(SELECTION_REQUESTS, num_instances)


def _scaled(requests: int, num_instances: int) -> int:
    """`requests` for a fleet of REFERENCE_FLEET instances, for `num_instances` (never fewer,
    at most MAX_SCALED_SELECTION_REQUESTS)."""
    scaled = max(requests, math.ceil(requests * num_instances / REFERENCE_FLEET))
    return min(scaled, MAX_SCALED_SELECTION_REQUESTS)


def selection_shape(
    horizon_requests: int | None, num_traces: int, num_instances: int = REFERENCE_FLEET
) -> tuple[int, int]:
    """Requests per selection trace and selection traces per candidate, for traffic of
    `horizon_requests` requests (None: not known) on `num_instances` instances, and
    `num_traces` traces at full length.

    A trace as long as the traffic planned for, up to MAX_SELECTION_REQUESTS on REFERENCE_FLEET
    instances and proportionally more on a larger fleet (at most MAX_SCALED_SELECTION_REQUESTS):
    how far queues grow, and how much of the run is the fill from an empty fleet, depend on the
    length. On bursty traces of 800 requests, selection traces of 2,000 found splits 14-24%
    ahead of one stage on the mean; on the traces themselves they ran at up to 1.12x the best
    baseline's mean and 1.26x its p99, where traces of 800 requests put the same splits behind
    one stage (docs/benchmarks.md, "Short traces"). A shorter trace than SELECTION_REQUESTS is
    a noisier sample, so there are more of them, as many requests in all as `num_traces` of
    SELECTION_REQUESTS (at most MAX_SELECTION_TRACES); the simulation time stays about the
    same."""
    if horizon_requests is None:
        return default_selection_requests(num_instances), num_traces
    n = max(1, min(horizon_requests, _scaled(MAX_SELECTION_REQUESTS, num_instances)))
    if n >= SELECTION_REQUESTS:
        return n, num_traces
    return n, min(MAX_SELECTION_TRACES, math.ceil(num_traces * SELECTION_REQUESTS / n))


def gaps_cv(arrivals: Sequence[float]) -> float:
    """Coefficient of variation of the gaps between sorted arrival times (1.0 with too few)."""
    times = sorted(arrivals)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if len(gaps) < 2:
        return 1.0
    mean = sum(gaps) / len(gaps)
    if mean <= 0:
        return 1.0
    var = sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
    return math.sqrt(var) / mean


def selection_trace(
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    rate: float,
    seed: int,
    arrival_cv: float = 1.0,
    num_requests: int = SELECTION_REQUESTS,
    gaps: Sequence[float] | None = None,
) -> list[TraceEntry]:
    """`num_requests` arrivals at `rate`, a block bootstrap of the planning samples. With
    `gaps` (a trace's gap before each of its requests) the requests are drawn with their own
    gaps, rescaled to `rate`, in blocks of `TRACE_BLOCK` consecutive ones from random starts;
    without them, lengths in blocks of `SELECTION_BLOCK` and Gamma gaps of coefficient of
    variation `arrival_cv` (1.0 is Poisson); at a `rate` of `math.inf` (an offline batch)
    every request arrives at once."""
    rng = random.Random(seed + SELECTION_SEED_OFFSET)
    n = len(prompt_lens)
    if gaps and sum(gaps) > 0:
        if len(gaps) != n:
            raise ValueError(f"{len(gaps)} gaps for {n} requests: one gap before each")
        return _joint_resample(rng, prompt_lens, output_lens, gaps, rate, num_requests)
    gap_stream = itertools.repeat(0.0) if math.isinf(rate) else _gamma_gaps(rng, rate, arrival_cv)
    now, i = 0.0, 0
    trace: list[TraceEntry] = []
    for k in range(num_requests):
        if k % SELECTION_BLOCK == 0:
            i = rng.randrange(n)
        now += next(gap_stream)
        trace.append((now, prompt_lens[i], output_lens[i]))
        i = (i + 1) % n
    return trace


def _joint_resample(
    rng: random.Random,
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    gaps: Sequence[float],
    rate: float,
    num_requests: int,
) -> list[TraceEntry]:
    """A trace's requests with the gaps before them, in blocks of `TRACE_BLOCK` from random
    starts, the gaps scaled to a mean of 1 / `rate`. Drawn apart, lengths and gaps lose what
    ties them: on a trace whose short chat came at 25 req/s and whose long documents then came
    at 4 req/s, the documents drawn into the chat's gaps made an overload the trace never had,
    and the split chosen for it ran at 1.13x least-load's mean and 1.32x its p99
    (docs/benchmarks.md, "Requests drawn with their own gaps")."""
    n = len(prompt_lens)
    scale = n / (rate * sum(gaps))
    now, i = 0.0, 0
    trace: list[TraceEntry] = []
    for k in range(num_requests):
        if k % TRACE_BLOCK == 0:
            i = rng.randrange(n)
        now += gaps[i] * scale
        trace.append((now, prompt_lens[i], output_lens[i]))
        i = (i + 1) % n
    return trace


@dataclass(frozen=True)
class Conversation:
    """A trace file's session, or a request outside any, as the selection traces redraw it:
    a session's turns stay together, with the time between them, so the prefix caches the
    simulator keeps see the turns that reuse them."""

    start_s: float
    """When its first request arrives."""
    requests: tuple[tuple[float, int, int, int, int], ...]
    """`(arrival_s - start_s, prompt_len, output_len, turn, prefix_len)` in arrival order."""
    is_session: bool


def conversation_trace(
    conversations: Sequence[Conversation],
    time_scale: float,
    seed: int,
    num_requests: int = SELECTION_REQUESTS,
    arrival_cv: float | None = None,
) -> list[TraceEntry]:
    """As many conversations as `conversations` holds, redrawn whole in blocks of
    `SELECTION_BLOCK` consecutive ones from random starts, every time (the gaps between
    conversations' starts and the turns' times within one) multiplied by `time_scale`, as a
    benchmark rescales the trace to its rate; the first `num_requests` arrivals of them, as a
    benchmark runs the first requests of the trace. The gaps between starts are the trace's
    own resampled in blocks of `GAP_BLOCK` (`selection_trace`), or Gamma gaps of `arrival_cv`
    where one is given. Every draw of a session is a session of its own.

    Resampling requests one by one, as `selection_trace` does, loses the sessions and with them
    the prefix caches: on ShareGPT conversations (70% of prompt tokens cached) one stage then
    simulated at 7x its figure on the trace itself, and a split was chosen that ran at 3.1x
    least-load's mean latency. A stream of conversations cut at `num_requests` misses how a
    finite trace ends, its longest conversations running on alone; a draw of the trace's
    whole population keeps it (docs/benchmarks.md, "Sessions in the selection traces")."""
    rng = random.Random(seed + SELECTION_SEED_OFFSET)
    starts = [c.start_s for c in conversations]
    start_gaps = [b - a for a, b in itertools.pairwise(starts)]
    gap_stream: Iterator[float]
    if sum(start_gaps) <= 0:
        gap_stream = itertools.repeat(0.0)  # one conversation, or all starting at once
    else:
        rate = len(start_gaps) / (sum(start_gaps) * time_scale)  # of conversations' starts
        if arrival_cv is None:
            own_rng = random.Random(-(seed + SELECTION_SEED_OFFSET))
            gap_stream = _resampled_gaps(own_rng, start_gaps, rate)
        else:
            gap_stream = _gamma_gaps(rng, rate, arrival_cv)
    trace: list[TraceEntry] = []
    now, i = 0.0, 0
    for drawn in range(len(conversations)):
        if drawn % SELECTION_BLOCK == 0:
            i = rng.randrange(len(conversations))
        if drawn > 0:
            now += next(gap_stream)
        c = conversations[i]
        for offset, prompt, output, turn, prefix in c.requests:
            at = now + offset * time_scale
            if c.is_session:
                trace.append((at, prompt, output, drawn, turn, prefix))
            else:
                trace.append((at, prompt, output))
        i = (i + 1) % len(conversations)
    trace.sort(key=lambda e: e[0])
    return trace[:num_requests]


def _gamma_gaps(rng: random.Random, rate: float, cv: float) -> Iterator[float]:
    shape = 1.0 / max(cv, 1e-3) ** 2
    while True:
        yield rng.gammavariate(shape, 1.0 / (rate * shape))


def _resampled_gaps(rng: random.Random, gaps: Sequence[float], rate: float) -> Iterator[float]:
    """`gaps` scaled to a mean of 1 / `rate`, in blocks of GAP_BLOCK from random starts."""
    scale = len(gaps) / (rate * sum(gaps))
    while True:
        at = rng.randrange(len(gaps))
        for k in range(GAP_BLOCK):
            yield gaps[(at + k) % len(gaps)] * scale


def simulated_e2e(
    plan: _core.StagePlan,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    trace: Sequence[TraceEntry],
    config: CascadeConfig | None = None,
) -> tuple[float, float]:
    """Mean and p99 end-to-end latency of the plan's layout on `trace`, with the policy as it
    will run (`config`, default CascadeConfig()); NaN when a request did not finish."""
    mean, p99, _ = simulated_figures(plan, summary, profile, num_instances, trace, config)
    return mean, p99


def simulated_figures(
    plan: _core.StagePlan,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    trace: Sequence[TraceEntry],
    config: CascadeConfig | None = None,
    slo: GoodputSlo | None = None,
) -> tuple[float, float, float]:
    """`simulated_e2e`'s two figures and, with `slo`, the share of requests meeting it (NaN
    without one, and all three NaN when a request did not finish)."""
    instances = list(range(num_instances))
    policy = _core.Scheduler.cascade(
        profile, plan, instances, summary.grid, config or CascadeConfig(), summary
    )
    report = _core.simulate(policy, profile, trace, instances)
    result = report.summary()
    if result["completed"] < len(trace):
        return math.nan, math.nan, math.nan
    share = math.nan
    if slo is not None:
        share = report.goodput(slo.ttft_base_s, slo.ttft_per_prompt_token_s, slo.tpot_s)
    return float(result["mean_e2e_s"]), float(result["p99_e2e_s"]), share


def _split_plans(
    best: _core.StagePlan, summary: _core.Workload, profile: _core.CostProfile, n: int
) -> list[_core.StagePlan]:
    """The partitioner's best plan for each stage count tried, fewest stages first."""
    # One solve gives the best plan with at most k stages for every k up to its limit (what
    # partition(..., k) returns; None where infeasible). The solve's cost grows with the limit
    # and a layer does not depend on the layers above it, so it stops at the largest count
    # tried: at 512 instances the partitioner's best has 24 stages, and solving all 24 layers
    # was most of the planning time (docs/benchmarks.md, "Planning time").
    limit = min(len(best.stages), max(STAGE_COUNTS))
    by_count = _core.partition_by_stage_count(summary, profile, n, limit)
    plans: list[_core.StagePlan] = []
    for k in sorted({*STAGE_COUNTS, len(best.stages)}):
        if k > len(best.stages):
            continue
        plan = best if k == len(best.stages) else by_count[k - 1]  # k <= limit here
        if plan is None:
            continue  # this few stages cannot carry the rate
        if len(plan.stages) > 1 and all(len(p.stages) != len(plan.stages) for p in plans):
            plans.append(plan)  # "at most k" may find a count already tried
    return plans


OBJECTIVES = ("mean", "p99", "goodput")
"""What the layout selection optimizes: mean or p99 end-to-end latency (the other figure is
the one allowed `MAX_P99_SLACK`, named for the default objective), or goodput, the share of
requests meeting a TTFT and a TPOT target (`GoodputSlo`), with the mean second
(`_by_goodput`)."""

GOODPUT_SLACK = 0.01
"""Under the goodput objective, candidates within this share of requests of the best simulated
goodput tie, and the layout the latency rules pick stays among them. Goodput is a share of a
few thousand requests per selection trace, and on mixtures where a split wins on latency it
gave up 11-26% of goodput (long prompts' prefills crowd the few instances of the long stage,
whose decode steps then run past the TPOT target), while one stage kept it; a point is what
the draws' noise leaves undecided (docs/benchmarks.md, "Goodput as the objective")."""


GOODPUT_GUARD = 0.05
"""Under the latency objectives, the layout the rules pick runs unless it trails the best
candidate's simulated goodput by more than this share of requests: then, of the candidates
within it, the one of least regret against the baselines' forms (`_goodput_guard`). A split
can win the mean by starving one class: on a mixture of reasoning answers, 4K-token prompts
and 15K-token documents on 32 instances the mean's pick ran at 0.81x least-load's mean and
0.77x its p99 while 37% of requests missed the SLO, against 11% under least-load (the
documents' prefills crowded the long stage, whose decode steps ran at 0.38 s a token). Five
points is well past the draws' noise (about a point, `GOODPUT_SLACK`), so the guard leaves the
latency objectives alone wherever the picks' goodput is level (docs/benchmarks.md, "A goodput
guard under the default objective")."""


def latency_objective(objective: str) -> str:
    """The latency figure the split rules rank by for `objective`: goodput ranks its ties by
    the mean."""
    return "p99" if objective == "p99" else "mean"


def _trails_by(per_trace: Sequence[tuple[float, ...]], plain: Sequence[tuple[float, ...]]) -> float:
    """Mean over traces of the mean-latency ratio to plain one stage: 0 where one stage left
    requests unfinished (any split that finishes beats it), inf where the split did."""
    if any(math.isnan(b[0]) for b in plain):
        return 0.0
    if any(math.isnan(a[0]) for a in per_trace):
        return math.inf
    return sum(a[0] / b[0] for a, b in zip(per_trace, plain, strict=True)) / len(per_trace)


def paired_ratios(c: Candidate, base: Candidate, objective: str) -> tuple[float, float]:
    """`c`'s figures over `base`'s (objective's first), averaged over the selection traces
    trace by trace: each trace counts alike, where a ratio of the averages would let the
    heaviest trace (a heavy-tailed preset's unlucky draw) decide alone."""
    pairs = list(zip(c.per_trace, base.per_trace, strict=True))
    k = 1 if objective == "p99" else 0
    primary = sum(a[k] / b[k] for a, b in pairs) / len(pairs)
    secondary = sum(a[1 - k] / b[1 - k] for a, b in pairs) / len(pairs)
    return primary, secondary


def _beats(
    c: Candidate,
    base: Candidate,
    objective: str,
    gain: float,
    primary_slack: float,
    secondary_slack: float,
) -> bool:
    """Whether `c` finished everything and, against `base`: the ratio of its `objective`
    figure is at most 1 + `primary_slack`, the other figure's at most 1 + `secondary_slack`,
    and the two ratios' average at most 1 - `gain`. Anything that finishes beats a `base` that
    did not."""
    if math.isnan(c.simulated_mean_e2e_s):
        return False
    if math.isnan(base.simulated_mean_e2e_s):
        return True
    primary, secondary = paired_ratios(c, base, objective)
    return (
        primary <= 1.0 + primary_slack
        and secondary <= 1.0 + secondary_slack
        and (primary + secondary) / 2 <= 1.0 - gain
    )


def one_stage_form(one_stage: Sequence[Candidate], objective: str = "mean") -> Candidate:
    """The one-stage candidate to run among `one_stage` (plain first, then the alternatives in
    order): an alternative replaces the form kept so far only by cutting its `objective` ratio,
    and the average of both ratios, by MIN_BALANCE_GAIN, by cutting the other figure on every
    selection trace (`_gains_on_every_trace`), or by cutting it by LARGE_TAIL_GAIN on average
    and on no trace less than nothing (`_large_tail_gain`)."""
    single, *alternatives = one_stage
    for c in alternatives:
        if (
            _beats(c, single, objective, MIN_BALANCE_GAIN, -MIN_BALANCE_GAIN, 1.0)
            or _gains_on_every_trace(c, single, objective)
            or _large_tail_gain(c, single, objective)
        ):
            single = c
    return single


def _large_tail_gain(c: Candidate, base: Candidate, objective: str) -> bool:
    """Whether `c` and `base` finished everything and, against `base`: `c`'s `objective`
    ratio is at most 1 + MIN_BALANCE_GAIN, its other figure is not above `base`'s on any
    selection trace, and that figure's ratio averages at most 1 - LARGE_TAIL_GAIN."""
    if not _both_finished_apart(c, base):
        return False
    primary, secondary = paired_ratios(c, base, objective)
    return (
        primary <= 1.0 + MIN_BALANCE_GAIN
        and secondary <= 1.0 - LARGE_TAIL_GAIN
        and all(r <= 1.0 for r in _other_ratios(c, base, objective))
    )


def _gains_on_every_trace(c: Candidate, base: Candidate, objective: str) -> bool:
    """Whether `c` finished everything, its `objective` ratio to `base` averages at most 1, and
    its other figure is at least STEADY_TAIL_GAIN below `base`'s on every selection trace."""
    return _steady_tail_gain(c, base, objective) and paired_ratios(c, base, objective)[0] <= 1.0


def _both_finished_apart(c: Candidate, base: Candidate) -> bool:
    """Whether `c` is not `base` and both finished every request on every trace they ran."""
    return (
        c is not base
        and not math.isnan(c.simulated_mean_e2e_s)
        and not math.isnan(base.simulated_mean_e2e_s)
    )


def _other_ratios(c: Candidate, base: Candidate, objective: str) -> list[float]:
    """`c`'s figure that is not the `objective` over `base`'s, selection trace by trace."""
    other = 0 if objective == "p99" else 1
    return [a[other] / b[other] for a, b in zip(c.per_trace, base.per_trace, strict=True)]


def _steady_tail_gain(c: Candidate, base: Candidate, objective: str) -> bool:
    """Whether `c` and `base` finished everything and `c`'s figure that is not the `objective`
    is at least STEADY_TAIL_GAIN below `base`'s on every selection trace (False for `base`
    itself)."""
    if not _both_finished_apart(c, base):
        return False
    return all(r <= 1.0 - STEADY_TAIL_GAIN for r in _other_ratios(c, base, objective))


def _steady_split_gain(c: Candidate, base: Candidate) -> bool:
    """Whether `c` and `base` finished everything, `c` is not behind `base` on either figure
    on any selection trace, and the average of its two ratios is STEADY_SPLIT_GAIN below 1."""
    if not _both_finished_apart(c, base):
        return False
    return (
        all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(c.per_trace, base.per_trace, strict=True))
        and sum(paired_ratios(c, base, "mean")) / 2 <= 1.0 - STEADY_SPLIT_GAIN
    )


def split_beats(split: Candidate, single: Candidate, objective: str = "mean") -> bool:
    """Whether `split` beats `single` (plain one stage, in `pick`): its `objective` ratio at
    most 1 - MIN_GAIN, the other figure's at most 1 + MAX_P99_SLACK, and their average at most
    1 - MIN_GAIN (a split that only ties on the tail needs twice the gain on the mean)."""
    return _beats(split, single, objective, MIN_GAIN, -MIN_GAIN, MAX_P99_SLACK)


def choose_layout(
    best: _core.StagePlan,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    traces: Sequence[Sequence[TraceEntry]],
    config: CascadeConfig | None = None,
    objective: str = "mean",
    goodput_slo: GoodputSlo | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """`best` is the partitioner's unconstrained plan, `config` the policy configuration to
    run (default CascadeConfig()), `objective` one of OBJECTIVES; `goodput_slo` the targets
    the goodput objective and the goodput guard count (default GoodputSlo()). Returns the
    chosen candidate (`pick`) and every candidate simulated."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: known {', '.join(OBJECTIVES)}")
    slo = goodput_slo or GoodputSlo()
    config = config or CascadeConfig()
    single_plan = _core.single_stage_plan(summary, profile, num_instances)
    one_stage = replace(config, is_one_stage_balanced=False, is_one_stage_kv_first=False)
    runs = [
        (single_plan, one_stage),
        (single_plan, replace(one_stage, is_one_stage_balanced=True)),
        (single_plan, replace(one_stage, is_one_stage_kv_first=True)),
    ]
    if any(len(entry) > 3 for trace in traces for entry in trace):
        runs += [
            (single_plan, replace(one_stage, one_stage_turns=t, is_one_stage_kv_first=kv_first))
            for t, kv_first in SESSION_FORMS
        ]
    num_one_stage = len(runs)
    # The simulator and the partitioner release the GIL: the candidates' runs share the cores,
    # and the one-stage candidates run while the split plans are solved. Every candidate runs
    # on the first PRUNE_AFTER traces; a split that trails one stage there by PRUNE_RATIO
    # cannot plausibly win and skips the rest.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:

        def submit(k: int, on: Sequence[Sequence[TraceEntry]]) -> list[Future[Figures]]:
            plan, cfg = runs[k]
            return [
                pool.submit(simulated_figures, plan, summary, profile, num_instances, t, cfg, slo)
                for t in on
            ]

        split_plans = pool.submit(_split_plans, best, summary, profile, num_instances)
        first = [submit(k, traces[:PRUNE_AFTER]) for k in range(num_one_stage)]
        runs += [(plan, config) for plan in split_plans.result()]
        first += [submit(k, traces[:PRUNE_AFTER]) for k in range(num_one_stage, len(runs))]
        results = [[f.result() for f in fs] for fs in first]
        kept = [
            k
            for k in range(len(runs))
            if k < num_one_stage or _trails_by(results[k], results[0]) <= PRUNE_RATIO
        ]
        rest = {k: submit(k, traces[PRUNE_AFTER:]) for k in kept}
        for k, fs in rest.items():
            results[k] += [f.result() for f in fs]
        candidates = [
            _candidate(len(plan.stages), plan, cfg, figures)
            for (plan, cfg), figures in zip(runs, results, strict=True)
        ]
        rules = _SplitRules.of(candidates, len(traces), latency_objective(objective))
        splits = [c for c in candidates[num_one_stage:] if not c.is_pruned(len(traces))]
        starts = sorted(splits, key=lambda c: (not rules.admits(c), rules.score(c)))
        for start in starts[:SIZE_SEARCH_STARTS]:
            candidates += _search_sizes(
                start, rules, summary, profile, num_instances, traces, pool, slo
            )
            if any(c.num_stages > 1 and rules.admits(c) for c in candidates):
                break
    return pick(candidates, len(traces), objective), candidates


Figures = tuple[float, float, float]
"""(mean, p99, goodput) of one candidate on one selection trace (`simulated_figures`)."""


def _candidate(
    num_stages: int,
    plan: _core.StagePlan,
    config: CascadeConfig,
    figures: Sequence[Figures],
    *,
    is_resized: bool = False,
) -> Candidate:
    """A candidate with its figures on each trace it ran."""
    per_trace = tuple((mean, p99) for mean, p99, _ in figures)
    shares = tuple(share for _, _, share in figures)
    return Candidate(num_stages, plan, config, per_trace, is_resized, shares)


def _search_sizes(
    start: Candidate,
    rules: _SplitRules,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    traces: Sequence[Sequence[TraceEntry]],
    pool: ThreadPoolExecutor,
    slo: GoodputSlo,
) -> list[Candidate]:
    """Layouts with `start`'s stage ranges and other instance counts: one instance at a time
    moves from one stage to another while that cuts `pick`'s score of the layout by SIZE_GAIN,
    on all selection traces and on those that did not choose it (`_holdout_gain`), keeping it
    a layout `pick` admits where `start` was one, at most SIZE_SEARCH_ROUNDS moves. From a
    layout `pick` turns away, a move to one it admits is taken whatever the score: the score
    weighs mean and tail alike, while admission asks the tail not to exceed one stage's.
    Returns each layout moved to, the last the best. Every neighbour runs on the first
    PRUNE_AFTER traces, the SIZE_SEARCH_FINALISTS closest to the layout moved from on all.

    Why: the partitioner sizes stages for a steady state, where the long stages hold every
    request that grows into them for as long as it decodes there. A finite run, and bursts of
    new requests, load the short stages more than that: on reasoning traffic (answers of
    thousands of tokens) the partitioner's sizes left the first stages' batches as large as
    least-load's, for 0.96x its mean, where the sizes this search moved to ran at 0.81x and the
    best of all 455 ways to size those stages at 0.78x (docs/benchmarks.md, "Stage sizes
    searched by simulation"). On bimodal traffic below capacity every split of the
    partitioner's was ~20% ahead of one stage on the mean and 1-4% behind on the p99, and one
    instance more in the documents' stage kept their tail ("Into the layouts the pick
    admits")."""
    found: list[Candidate] = []
    current, config = start, start.config
    for _ in range(SIZE_SEARCH_ROUNDS):
        plans = [
            _core.resized_plan(summary, profile, current.plan, list(sizes))
            for sizes in _size_neighbours([s.num_instances for s in current.plan.stages])
        ]

        def run(plan: _core.StagePlan, on: Sequence[Sequence[TraceEntry]]) -> list[Future[Figures]]:
            return [
                pool.submit(
                    simulated_figures, plan, summary, profile, num_instances, t, config, slo
                )
                for t in on
            ]

        heads = [(plan, run(plan, traces[:PRUNE_AFTER])) for plan in plans]
        first = [(plan, [f.result() for f in fs]) for plan, fs in heads]
        first.sort(key=lambda pr: _trails_by(pr[1], current.per_trace[:PRUNE_AFTER]))
        finalists = [
            (plan, figures, run(plan, traces[PRUNE_AFTER:]))
            for plan, figures in first[:SIZE_SEARCH_FINALISTS]
        ]
        tried = [
            _candidate(
                current.num_stages,
                plan,
                config,
                [*figures, *(f.result() for f in rest)],
                is_resized=True,
            )
            for plan, figures, rest in finalists
        ]
        admitted = [c for c in tried if rules.admits(c)]
        if admitted and not rules.admits(current):
            best = min(admitted, key=rules.score)  # into the layouts `pick` takes
        else:
            eligible = admitted if rules.admits(current) else tried
            if not eligible:
                break
            best = min(eligible, key=rules.score)
            if (
                math.isnan(best.simulated_mean_e2e_s)
                or rules.score(best) > rules.score(current) - SIZE_GAIN
                or _holdout_gain(best, current) < SIZE_GAIN
            ):
                break
        found.append(best)
        current = best
    return found


def _holdout_gain(c: Candidate, current: Candidate) -> float:
    """1 less the average of `c`'s two ratios to `current` on the traces after PRUNE_AFTER,
    which did not choose the finalists: the best of up to 30 layouts on two traces shows a
    gain there by chance."""
    if len(c.per_trace) <= PRUNE_AFTER:
        return 0.0
    held_out, before = (replace(x, per_trace=x.per_trace[PRUNE_AFTER:]) for x in (c, current))
    return 1.0 - sum(paired_ratios(held_out, before, "mean")) / 2


def _size_neighbours(sizes: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """`sizes` with one instance moved from one stage to another, every stage keeping one: to
    any other stage while that makes at most MAX_SIZE_NEIGHBOURS layouts, else to a
    neighbouring stage only (the search's cost grows with the count)."""
    k = len(sizes)
    pairs: Iterator[tuple[int, int]] = itertools.permutations(range(k), 2)
    if k * (k - 1) > MAX_SIZE_NEIGHBOURS:
        pairs = ((a, b) for a, b in pairs if abs(a - b) == 1)
    for src, dst in pairs:
        if sizes[src] > 1:
            moved = list(sizes)
            moved[src] -= 1
            moved[dst] += 1
            yield tuple(moved)


def pick(
    candidates: Sequence[Candidate],
    num_traces: int,
    objective: str = "mean",
    *,
    with_least_regret: bool = True,
) -> Candidate:
    """The layout to run among `candidates` (the one-stage forms first, plain one stage the
    first of them; then the splits), simulated on `num_traces` traces.

    The one-stage form is `one_stage_form`'s. A split must beat plain one stage
    (`split_beats`: its p99 no worse than least-load's exactly), and the one-stage form kept by
    MIN_GAIN on its `objective` ratio, with the average of both ratios at most 1 and its other
    ratio at most 1 + KEPT_TAIL_SLACK (1 + KEPT_STEADY_TAIL_SLACK where the form kept shows its
    tail gain on every selection trace, `_steady_tail_gain`). Of those, the lowest average
    wins (fewer stages on a tie): two splits within 1% on the mean can be 10% apart on the p99.

    Why the tail is held loosely to the form kept: a balanced or Llumnix-style form is the best
    of three noisy simulations, so its p99 is biased low. Holding splits to it exactly turned
    away splits 35% ahead of one stage on the mean that ran at 0.57x the best baseline's mean,
    while the form kept ran at 1.03x (docs/benchmarks.md, "Short traces"); asking the average
    of the two ratios to fall by MIN_GAIN as well, as until the twenty-fourth session, turned
    away a split 15% ahead of a balanced form on the mean for one resample's p99, and the
    balanced form ran at 1.05x / 1.12x least-load's mean and p99, the split at 0.81x / 0.77x
    (docs/benchmarks.md, "A split held to the form kept's tail").

    Last, where the layout so chosen trails a baseline's form on either figure, the candidate
    of least regret against them runs (`_least_regret`; `with_least_regret` False leaves it
    out, for comparisons).

    Under the goodput objective, the layout so chosen runs unless another candidate's
    simulated goodput is more than GOODPUT_SLACK higher (`_by_goodput`); under the latency
    objectives, unless it trails the best goodput by more than GOODPUT_GUARD
    (`_goodput_guard`)."""
    if objective == "goodput":
        by_latency = pick(candidates, num_traces, "mean", with_least_regret=with_least_regret)
        return _by_goodput(candidates, num_traces, by_latency)
    rules = _SplitRules.of(candidates, num_traces, objective)
    splits = [c for c in candidates if c.num_stages > 1 and rules.admits(c)]
    chosen = min(splits, key=lambda c: (rules.score(c), c.num_stages)) if splits else rules.single
    if not with_least_regret:  # the rules alone (bench/selection_on_trace.py compares)
        return chosen
    return _goodput_guard(candidates, num_traces, _least_regret(candidates, chosen, num_traces))


def _least_regret(candidates: Sequence[Candidate], chosen: Candidate, num_traces: int) -> Candidate:
    """`chosen`, unless the selection traces show it behind a baseline on either figure
    (`regret` above 1): then the candidate of least regret, where that is lower.

    The one-stage candidates other than the balanced form run a baseline decision for
    decision (least-load's way and Llumnix's; with sessions, the cache-aware baseline's too,
    beside cascade's own placement of turns, which only raises the bar), so the selection
    traces show what each baseline would do. The rules above compare a split
    with plain one stage and the form kept, figure by figure, and keep one stage unless a split
    wins by a margin: where least-load has the lowest p99 and Llumnix the lowest mean (below
    capacity, Llumnix's moves cut every decode a few percent, while its tail is a little
    longer), the form kept is behind one baseline on one figure whichever it is, and
    cascade ran at 1.03x the best baseline's mean on bimodal traffic and at 1.05-1.11x its
    p99 on production mixes at a quarter of the planned rate, while splits 3-6% ahead of both
    forms on the mean at their p99 were turned away for a tail 0.1% above plain one stage's
    (docs/benchmarks.md, "Least regret against the baselines' forms")."""
    forms = _baseline_forms(candidates, num_traces)
    ran = [c for c in candidates if not c.is_pruned(num_traces)]
    if chosen.is_pruned(num_traces) or any(math.isnan(c.simulated_mean_e2e_s) for c in forms):
        return chosen  # past what the fleet carries: the rules above decide alone
    behind = regret(chosen, forms)
    if behind <= 1.0:
        return chosen
    least, lowest = min(((c, regret(c, forms)) for c in ran), key=lambda scored: scored[1])
    return least if lowest < behind else chosen


def _goodput_guard(
    candidates: Sequence[Candidate], num_traces: int, chosen: Candidate
) -> Candidate:
    """`chosen`, unless a candidate that ran on every selection trace has a simulated goodput
    more than GOODPUT_GUARD above its own: then, of the candidates within GOODPUT_GUARD of the
    highest goodput and no further behind a baseline's form than `chosen` (`regret` at most
    the larger of 1 and `chosen`'s), the one of least regret (the mean and the tail alike;
    fewer stages on a tie). Where goodput was not measured, `chosen` left a request
    unfinished, or no candidate qualifies, `chosen` stands.

    Why the regret bound: the guard buys goodput, never at the price of the latency bound the
    selection holds. Without it, on a mixture 1.55x past capacity, the guard swapped a split
    of regret 0.98 for one of 1.006 and 8 points more goodput, which ran at 1.05x least-load's
    p99 (docs/benchmarks.md, "A goodput guard under the default objective")."""
    ran = [
        c for c in candidates if not c.is_pruned(num_traces) and not math.isnan(c.simulated_goodput)
    ]
    if not ran or math.isnan(chosen.simulated_goodput):
        return chosen
    best = max(c.simulated_goodput for c in ran)
    if chosen.simulated_goodput >= best - GOODPUT_GUARD:
        return chosen
    forms = _baseline_forms(candidates, num_traces)
    if not forms or any(math.isnan(c.simulated_mean_e2e_s) for c in forms):
        return chosen
    bound = max(1.0, regret(chosen, forms))
    scored = [(regret(c, forms), c) for c in ran if c.simulated_goodput >= best - GOODPUT_GUARD]
    eligible = [(r, c) for r, c in scored if r <= bound]
    if not eligible:
        return chosen
    return min(eligible, key=lambda rc: (rc[0], rc[1].num_stages))[1]


def _by_goodput(
    candidates: Sequence[Candidate], num_traces: int, by_latency: Candidate
) -> Candidate:
    """`by_latency`, unless a candidate that ran on every selection trace has a simulated
    goodput more than GOODPUT_SLACK above its own: then, of the candidates within
    GOODPUT_SLACK of the highest goodput, the one with the lowest mean end-to-end latency
    (trace by trace over plain one stage's; fewer stages on a tie). A candidate that left a
    request unfinished has no goodput and is never taken here."""
    ran = [
        c for c in candidates if not c.is_pruned(num_traces) and not math.isnan(c.simulated_goodput)
    ]
    if not ran:
        return by_latency
    best = max(c.simulated_goodput for c in ran)
    if by_latency.simulated_goodput >= best - GOODPUT_SLACK:  # False where NaN
        return by_latency
    plain = candidates[0]
    tied = [c for c in ran if c.simulated_goodput >= best - GOODPUT_SLACK]
    return min(tied, key=lambda c: (_trails_by(c.per_trace, plain.per_trace), c.num_stages))


def _baseline_forms(candidates: Sequence[Candidate], num_traces: int) -> list[Candidate]:
    """The one-stage candidates that run a baseline decision for decision (every one-stage
    form but the balanced one), as `regret` measures against them."""
    return [
        c
        for c in candidates
        if c.num_stages == 1 and not c.config.is_one_stage_balanced and not c.is_pruned(num_traces)
    ]


def regret(c: Candidate, forms: Sequence[Candidate]) -> float:
    """The larger of `c`'s mean and p99 end-to-end latency over the lowest of `forms` for that
    figure, each ratio averaged over the selection traces trace by trace (inf where `c` left a
    request unfinished): what the issue bounds by 1.02 against the best baseline."""
    if math.isnan(c.simulated_mean_e2e_s):
        return math.inf
    traces = range(len(c.per_trace))
    by_mean = [c.per_trace[t][0] / min(f.per_trace[t][0] for f in forms) for t in traces]
    by_p99 = [c.per_trace[t][1] / min(f.per_trace[t][1] for f in forms) for t in traces]
    return max(sum(by_mean) / len(by_mean), sum(by_p99) / len(by_p99))


@dataclass(frozen=True)
class _SplitRules:
    """What `pick` asks of a split, against plain one stage and the one-stage form kept."""

    plain: Candidate
    single: Candidate
    """The one-stage form kept (`one_stage_form`)."""
    num_traces: int
    objective: str
    tail_slack: float
    """The bound on a split's tail ratio to `single`, less 1."""

    @staticmethod
    def of(candidates: Sequence[Candidate], num_traces: int, objective: str) -> _SplitRules:
        plain = candidates[0]
        single = one_stage_form([c for c in candidates if c.num_stages == 1], objective)
        # The tail bound against the form kept: close to its own figure where every selection
        # trace shows its tail gain (the traffic's, not one draw's); looser otherwise, plain
        # one stage's, in `split_beats`, being the one that holds.
        steady = _steady_tail_gain(single, plain, objective)
        tail_slack = KEPT_STEADY_TAIL_SLACK if steady else KEPT_TAIL_SLACK
        return _SplitRules(plain, single, num_traces, objective, tail_slack)

    def admits(self, c: Candidate) -> bool:
        """Whether split `c` ran on every trace, beats plain one stage (`split_beats`) and
        beats the form kept by MIN_GAIN on its objective ratio, with the average of both
        ratios at most 1 and the other at most 1 + `tail_slack`; or, short of those margins,
        is not behind plain one stage nor the form kept on either figure on any trace and
        ahead on average (`_steady_split_gain`): a gain every resample shows is the
        traffic's, as `_steady_tail_gain` reasons for the one-stage forms."""
        if c.is_pruned(self.num_traces):
            return False
        if split_beats(c, self.plain, self.objective) and _beats(
            c, self.single, self.objective, 0.0, -MIN_GAIN, self.tail_slack
        ):
            return True
        return _steady_split_gain(c, self.plain) and (
            self.single is self.plain or _steady_split_gain(c, self.single)
        )

    def score(self, c: Candidate) -> float:
        """The average of `c`'s two ratios to the form kept: the lower, the better."""
        return sum(paired_ratios(c, self.single, self.objective)) / 2
