"""Prometheus metrics of the worker, defined once. Every metric carries the engine name, so a
simulated worker is never mistaken for a real one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cascadeinfer.worker.engine import StepReport


class WorkerMetrics:
    def __init__(self, engine: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["engine"]
        r = self.registry
        self.steps = Counter("cascade_worker_steps", "Engine steps run", labels, registry=r).labels(
            engine
        )
        self.step_time = Histogram(
            "cascade_worker_step_seconds", "Wall time of one engine step", labels, registry=r
        ).labels(engine)
        self.batch_size = Histogram(
            "cascade_worker_batch_size",
            "Requests progressing in one step",
            labels,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        ).labels(engine)
        self.running = Gauge(
            "cascade_worker_running", "Running requests", labels, registry=r
        ).labels(engine)
        self.waiting = Gauge(
            "cascade_worker_waiting", "Waiting requests", labels, registry=r
        ).labels(engine)
        self.kv_used = Gauge(
            "cascade_worker_kv_blocks_used", "KV blocks in use", labels, registry=r
        ).labels(engine)
        self.kv_free = Gauge(
            "cascade_worker_kv_blocks_free", "KV blocks free", labels, registry=r
        ).labels(engine)
        direction = [*labels, "direction"]
        self.migrations = Counter(
            "cascade_worker_migrations", "Completed migrations", [*direction, "mode"], registry=r
        )
        self.migration_failures = Counter(
            "cascade_worker_migration_failures",
            "Migrations that failed (request stayed)",
            direction,
            registry=r,
        )
        self.migration_bytes = Counter(
            "cascade_worker_migration_bytes", "KV bytes moved", direction, registry=r
        )
        self.migration_pause = Histogram(
            "cascade_worker_migration_pause_seconds",
            "Time a migrating request did not decode",
            labels,
            registry=r,
        ).labels(engine)
        self.prompt_tokens = Counter(
            "cascade_worker_prompt_tokens",
            "Prompt tokens of requests started here (not migrated in)",
            labels,
            registry=r,
        ).labels(engine)
        self.prompt_tokens_cached = Counter(
            "cascade_worker_prompt_tokens_cached",
            "Of cascade_worker_prompt_tokens, those served by the engine's prefix cache",
            labels,
            registry=r,
        ).labels(engine)
        self.orphans_reaped = Counter(
            "cascade_worker_orphans_reaped",
            "Detached requests aborted because no step feed followed them (orphan_timeout_s)",
            labels,
            registry=r,
        ).labels(engine)
        self.engine = engine

    def observe_load(self, running: int, waiting: int, kv_used: int, kv_free: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_used.set(kv_used)
        self.kv_free.set(kv_free)

    def observe_step(self, r: StepReport) -> None:
        self.steps.inc()
        self.step_time.observe(r.step_time_s)
        self.batch_size.observe(len(r.progress))
        self.observe_load(r.num_running, r.num_waiting, r.kv_blocks_used, r.kv_blocks_free)
        self.prompt_tokens.inc(r.prompt_tokens)
        self.prompt_tokens_cached.inc(r.prompt_tokens_cached)
