"""cascade-scheduler configuration: a frozen dataclass from flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cascadeinfer.config import POLICY_NAMES


@dataclass(frozen=True)
class StageSpec:
    min_len: int
    max_len: int
    num_workers: int


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    workers: tuple[str, ...] = ()
    """Static worker addresses; more may register themselves."""
    min_workers: int = 1
    """Routing starts once this many workers are known (defaults to len(workers))."""
    policy: str = "cascade"
    profile: str = "gpu-h100-llama3-8b"
    workload: str = "short-chat"
    """Preset or trace the initial cascade plan is made for (refinement adapts it)."""
    rate: float | None = None
    stages: tuple[StageSpec, ...] = ()
    """Explicit cascade stages instead of a plan: each (min_len, max_len, workers)."""
    max_queue: int = 1024
    tick_interval_s: float = 0.5
    max_concurrent_migrations: int = 8
    seed: int = 0

    def validate(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy = {self.policy!r}: known {', '.join(POLICY_NAMES)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue = {self.max_queue}: must be >= 0")
        if self.stages and sum(s.num_workers for s in self.stages) > max(
            self.min_workers, len(self.workers)
        ):
            raise ValueError("stages ask for more workers than --workers / --min-workers provide")


def parse_stages(text: str) -> tuple[StageSpec, ...]:
    """'0-512:2,512-2048:2,2048-8192:2' -> three stages of two workers each."""
    stages = []
    for part in text.split(","):
        try:
            bounds, count = part.split(":")
            lo, hi = bounds.split("-")
            stages.append(StageSpec(int(lo), int(hi), int(count)))
        except ValueError:
            raise ValueError(f"--stages {part!r}: expected MIN-MAX:WORKERS") from None
    return tuple(stages)


def parse_args(argv: list[str] | None) -> SchedulerConfig:
    p = argparse.ArgumentParser(
        prog="cascade-scheduler", description="CascadeInfer's length-aware scheduler."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", default="", help="comma-separated worker addresses")
    p.add_argument("--min-workers", type=int, help="start routing once this many workers are known")
    p.add_argument("--policy", default="cascade", choices=POLICY_NAMES)
    p.add_argument("--profile", default="gpu-h100-llama3-8b", help="cost profile name or JSON file")
    p.add_argument(
        "--workload", default="short-chat", help="preset or trace the initial plan is for"
    )
    p.add_argument("--rate", type=float, help="arrival rate the initial plan is for")
    p.add_argument("--stages", help="explicit stages MIN-MAX:WORKERS,... instead of a plan")
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--tick-interval-s", type=float, default=0.5)
    p.add_argument("--max-concurrent-migrations", type=int, default=8)
    a = p.parse_args(argv)
    workers = tuple(w for w in a.workers.split(",") if w)
    config = SchedulerConfig(
        host=a.host,
        port=a.port,
        workers=workers,
        min_workers=a.min_workers or max(1, len(workers)),
        policy=a.policy,
        profile=a.profile,
        workload=a.workload,
        rate=a.rate,
        stages=parse_stages(a.stages) if a.stages else (),
        max_queue=a.max_queue,
        tick_interval_s=a.tick_interval_s,
        max_concurrent_migrations=a.max_concurrent_migrations,
    )
    config.validate()
    return config
