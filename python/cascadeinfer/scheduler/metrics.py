"""Prometheus metrics of the scheduler, defined once.

Latencies are labelled by the stage a request entered (its first stage), so an operator sees
whether short requests stay fast when long ones share the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
DECISION_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)


REFUSAL_REASONS = frozenset(
    {
        "invalid_argument",  # an empty or oversized worker id or address
        "unreachable",  # the address did not answer, or its step feed did not come up
        "id_mismatch",  # the worker at the address answers to another id
        "id_in_use",  # another connected worker has the id
        "too_short",  # it holds shorter requests than the scheduler admits
        "another_scheduler",  # another scheduler holds it (worker/claim.py)
        "another_model",  # it serves another model than the workers already serving
        "leaving",  # the worker drains or was deregistered; its feed has not ended yet
        "unknown_worker",  # a goodbye for an id the scheduler does not know
        "not_draining",  # a goodbye the worker itself says is not its own: it is not draining
    }
)
"""Label values of `registrations_refused`: a fixed set, never a caller's string."""


@dataclass(frozen=True)
class StageLatency:
    """One entry stage's latency histograms, looked up once (a `labels` call per finished
    request and histogram is a lock and a dictionary look-up each)."""

    ttft: Histogram
    e2e: Histogram
    tpot: Histogram


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.ttft = Histogram(
            "cascade_scheduler_ttft_seconds",
            "Arrival to first token, by entry stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "cascade_scheduler_tpot_seconds",
            "Mean time per output token after the first, by entry stage",
            ["stage"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "cascade_scheduler_e2e_seconds",
            "Arrival to last token, by entry stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "cascade_scheduler_requests",
            "Requests that ended, by finish reason",
            ["finish"],
            registry=r,
        )
        self.refused = Counter(
            "cascade_scheduler_refused",
            "Requests refused at admission, by gRPC status",
            ["code"],
            registry=r,
        )
        self.tokens = Counter(
            "cascade_scheduler_tokens_relayed", "Output tokens streamed to clients", registry=r
        )
        self.queue_depth = Gauge(
            "cascade_scheduler_queue_depth", "Requests waiting for admission", registry=r
        )
        self.running = Gauge("cascade_scheduler_running", "Requests placed on a worker", registry=r)
        self.workers = Gauge(
            "cascade_scheduler_workers", "Workers known, by health", ["state"], registry=r
        )
        self.migrations = Counter(
            "cascade_scheduler_migrations",
            "Migrations, by reason and outcome (ok, failed, rate_limited, overtaken: the request "
            "ended before it could move)",
            ["reason", "outcome"],
            registry=r,
        )
        self.decision = Histogram(
            "cascade_scheduler_core_decision_seconds",
            "Wall time of one call into the Rust core, by call",
            ["call"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            "cascade_scheduler_http_responses",
            "Answers of the OpenAI HTTP API, by route and HTTP status (200 for a stream)",
            ["route", "status"],
            registry=r,
        )
        self.plan_changes = Counter(
            "cascade_scheduler_plan_changes",
            "Stage layout changes, by kind: refinement (boundaries, re-plans) or capacity (the "
            "capacity guard moved one worker to another stage)",
            ["kind"],
            registry=r,
        )
        self.background_failures = Counter(
            "cascade_scheduler_background_failures",
            "Background tasks (feeds, migrations, ticks) that died of an error, by task",
            ["task"],
            registry=r,
        )
        self.policy_step_errors = Counter(
            "cascade_scheduler_policy_step_errors",
            "Engine steps the policy refused (a length past the stages' last bound): the "
            "tokens were delivered, no migration was decided for that step",
            registry=r,
        )
        self.ghosts_aborted = Counter(
            "cascade_scheduler_ghosts_aborted",
            "Detached requests a worker's feed snapshot showed that this scheduler did not put "
            "there (left by a crashed scheduler or a worker given up on); aborted there",
            registry=r,
        )
        self.foreign_steps = Counter(
            "cascade_scheduler_foreign_steps",
            "Step-feed entries ignored: a worker reported a request the scheduler did not put there",
            registry=r,
        )
        self.tokens_past_max = Counter(
            "cascade_scheduler_tokens_past_max_tokens",
            "Step-feed entries that carried tokens past their request's max_tokens (dropped: "
            "a worker's bug or a lie; no engine sends them)",
            registry=r,
        )
        self.registrations_refused = Counter(
            "cascade_scheduler_registrations_refused",
            "WorkerRegistry calls refused, by call (register, deregister) and reason (one of "
            "REFUSAL_REASONS); calls without the cluster's credential are refused before",
            ["rpc", "reason"],
            registry=r,
        )
        self.admit_seconds = self.decision.labels("admit")
        self.on_step_seconds = self.decision.labels("on_step")
        self.tick_seconds = self.decision.labels("tick")
        self._stages: dict[int, StageLatency] = {}

    def stage(self, stage: int) -> StageLatency:
        """The latency histograms of requests that entered `stage`."""
        found = self._stages.get(stage)
        if found is None:
            label = str(stage)
            found = self._stages[stage] = StageLatency(
                self.ttft.labels(label), self.e2e.labels(label), self.tpot.labels(label)
            )
        return found
