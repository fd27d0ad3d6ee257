"""cascade-scheduler configuration: a frozen dataclass from a TOML file, overridden by flags."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cascadeinfer import workloads
from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.daemon import check_address, check_distinct_ports, check_port, check_seconds
from cascadeinfer.planning import MAX_INSTANCES, load_profile
from cascadeinfer.scheduler.text import load_tokenizer
from cascadeinfer.security import (
    TlsFiles,
    add_tls_arguments,
    check_exposure,
    read_client_tokens,
    read_token,
    tls_from_arguments,
)
from cascadeinfer.toml_config import check_table, check_types, read_toml
from cascadeinfer.traces import read_trace

MAX_QUEUE_LIMIT = 1_000_000
"""Largest `max_queue` (and `max_queue_per_client`) taken: each queued request holds its prompt."""

MAX_PROMPT_BYTES = 1 << 30
"""Largest `max_prompt_bytes` taken: the gRPC message limit it sets is a 32-bit integer, and
3,000,000,000 ended the scheduler with an OverflowError traceback."""

MIN_CALL_TIMEOUT_S = 0.01
"""Shortest `worker_call_timeout_s` and `migration_timeout_s` taken: at 1e-7 s every placement
timed out and was queued again, without end and without a word."""


@dataclass(frozen=True)
class StageSpec:
    min_len: int
    max_len: int
    num_workers: int


HTTP_MAX_BODY_BYTES = 4 << 20
"""Largest HTTP request body the front reads; a bigger one is refused with 413 before it is
read whole."""


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
    arrival_cv: float | None = None
    """Burstiness the initial plan is for: the coefficient of variation of the gaps between
    arrivals (1 is Poisson, 2-4 bursty). None: a trace's own gaps, else 1. The layout selection
    simulates Gamma arrivals of this variation, so a bursty fleet gets stages sized for bursts."""
    stages: tuple[StageSpec, ...] = ()
    """Explicit cascade stages instead of a plan: each (min_len, max_len, workers)."""
    is_capacity_guarded: bool = True
    """Cascade's capacity guard: a stage whose decode steps run 10% slower than the pooled
    fleet's for 10 s gets a worker from another stage (docs/design/partitioner.md). Off
    (`--no-capacity-guard`), stage sizes stay as planned; the plan is then chosen for that."""
    ttft_slo_s: float = 1.0
    ttft_slo_per_token_s: float = 2e-4
    """The first-token service level: ttft_slo_s plus this per prompt token. Cascade starts a
    new request whose first token is predicted to miss it in its own stage where it comes in
    time (docs/design/partitioner.md)."""
    max_queue: int = 1024
    max_queue_per_client: int = 0
    """Most queued requests one credential (client token) may hold; beyond, its new requests
    are refused RESOURCE_EXHAUSTED while other clients' are still queued. 0: max_queue."""
    max_prompt_bytes: int = 0
    """Largest text prompt in UTF-8 bytes, checked before tokenizing; 0: 16 bytes per token of
    the model's context (a few times what a prompt that fits can take)."""
    max_stream_lag_tokens: int = 4096
    """Tokens a client may leave unread; beyond, its request ends with RESOURCE_EXHAUSTED."""
    tick_interval_s: float = 0.5
    worker_link_timeout_s: float = 10.0
    """A worker link that answers no keepalive ping for about this long counts as broken (a
    cut link sends no reset): the worker leaves the plan and its requests resume elsewhere.
    With no worker left, accepted requests wait this long for one, then end with ABORT."""
    worker_call_timeout_s: float = 10.0
    """How long a worker may take to answer a call (start a request, abort one, say who it is)
    before the scheduler treats the call as failed."""
    migration_timeout_s: float = 60.0
    """How long a move may take before the scheduler gives up on it (the worker then resumes
    the request on the source)."""
    max_concurrent_migrations: int = 8
    max_optional_migrations_per_s: float = 4.0
    """Balance, refinement and rebalance moves allowed per second (a token bucket); moves at a
    stage bound are the pipeline itself and are only capped by max_concurrent_migrations."""
    metrics_port: int = 0
    """Prometheus HTTP exporter; 0 turns it off."""
    health_port: int = 0
    """gRPC health alone, open to probes without a token (`health_port.py`); 0 turns it off.
    With a token, health on the API port takes one."""
    tokenizer: str = ""
    """A Hugging Face tokenizer directory or tokenizer.json for text prompts; empty: token ids only."""
    auth_token_file: str = ""
    """File with the cluster's bearer token, which workers send (and clients too, unless there
    are client tokens); else $CASCADE_AUTH_TOKEN."""
    auth_token: str = field(default="", repr=False)
    """Resolved from auth_token_file or the environment; never logged."""
    client_tokens_file: str = ""
    """File with the tokens clients send, one per line; else $CASCADE_CLIENT_TOKEN. A client's
    token opens Generate, Abort and the HTTP API only; what workers and the operator do
    (registering a worker, the cluster's state) takes the cluster's token."""
    client_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Resolved from client_tokens_file or the environment; never logged."""
    insecure: bool = False
    """Serve a non-loopback host with neither a token nor mTLS (refused otherwise)."""
    tls: TlsFiles = field(default_factory=TlsFiles)
    seed: int = 0
    http_port: int | None = None
    """The OpenAI-compatible HTTP API (0: any free port); None turns it off. Needs tokenizer."""
    served_model_name: str = ""
    """The model name HTTP clients ask for; empty: the name the workers report."""
    chat_template: str = ""
    """A Jinja chat template file used instead of the tokenizer directory's own."""
    http_max_connections: int = 8192
    """Open HTTP connections at most; a request on one more is answered 503."""
    http_request_timeout_s: float = 30.0
    """An HTTP request's head, and then its body, must each arrive within this (else 408)."""
    http_max_body_bytes_in_flight: int = 64 * HTTP_MAX_BODY_BYTES
    """Bytes of request bodies the HTTP front holds at once while they arrive, over every
    connection; a body that would take it past this is answered 503 and its connection closed.
    Each body is bounded (4 MiB) and must arrive within http_request_timeout_s, but 400 slow
    bodies at once held 1.66 GB (docs/reliability.md, "The thirteenth probe's leftovers")."""

    def validate(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy = {self.policy!r}: known {', '.join(POLICY_NAMES)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port = {self.port}: must be in [0, 65535]")
        # Read here, not first by the plan: `cascade up` runs these checks before it starts
        # any worker.
        load_profile(self.profile)
        for k, address in enumerate(self.workers):
            check_address("workers", address)
            if address in self.workers[:k]:
                # One worker counted twice: --min-workers (the list's length) is never
                # reached, and the scheduler served nothing and said nothing.
                raise ValueError(f"workers: {address!r} is listed twice")
        if not 1 <= self.min_workers <= MAX_INSTANCES:
            # -1 was taken as 1 and 0 as the default: a typo the operator never heard of;
            # 10^23 was taken too, and never met.
            raise ValueError(f"min_workers = {self.min_workers}: must be in [1, {MAX_INSTANCES}]")
        # Bounded: a queue is a buffer, and 10^29 was taken (as good as no bound at all).
        for name in ("max_queue", "max_queue_per_client"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_QUEUE_LIMIT:
                raise ValueError(f"{name} = {value}: must be in [0, {MAX_QUEUE_LIMIT}]")
        if not 0 <= self.max_prompt_bytes <= MAX_PROMPT_BYTES:
            raise ValueError(
                f"max_prompt_bytes = {self.max_prompt_bytes}: must be in [0, {MAX_PROMPT_BYTES}]"
            )
        if self.max_stream_lag_tokens < 1:
            raise ValueError(f"max_stream_lag_tokens = {self.max_stream_lag_tokens}: must be >= 1")
        for name in (
            "worker_link_timeout_s",
            "worker_call_timeout_s",
            "migration_timeout_s",
            "tick_interval_s",
        ):
            check_seconds(name, getattr(self, name))
        for name in ("worker_call_timeout_s", "migration_timeout_s"):
            if getattr(self, name) < MIN_CALL_TIMEOUT_S:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r}: must be at least {MIN_CALL_TIMEOUT_S} s "
                    "(no call to a worker finishes sooner)"
                )
        check_seconds(
            "max_optional_migrations_per_s", self.max_optional_migrations_per_s, may_be_zero=True
        )
        check_port("metrics_port", self.metrics_port)
        check_port("health_port", self.health_port)
        check_distinct_ports(
            {
                "port": self.port,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
                "http_port": self.http_port,
            }
        )
        for name in ("ttft_slo_s", "ttft_slo_per_token_s"):
            check_seconds(name, getattr(self, name), may_be_zero=True)
        if self.max_concurrent_migrations < 1:
            raise ValueError(
                f"max_concurrent_migrations = {self.max_concurrent_migrations}: must be >= 1"
            )
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate = {self.rate}: must be > 0")
        if self.arrival_cv is not None and not (
            math.isfinite(self.arrival_cv) and self.arrival_cv > 0
        ):
            raise ValueError(f"arrival_cv = {self.arrival_cv}: must be > 0")
        _check_stages(self.stages)
        if self.policy == "cascade" and not self.stages:
            # Read at start: it was read only when the first plan was made, after the
            # scheduler had said it was serving (a missing file then stopped it, or left it
            # refusing every request).
            _check_workload(self.workload)
        wanted = sum(s.num_workers for s in self.stages)
        if wanted > self.min_workers:
            # The first plan is made once min_workers are up: with fewer than the stages name,
            # the scheduler said it served and then stopped ("stages ask for more than the 1
            # instances there are"), as after `--workers A,B --min-workers 1`.
            raise ValueError(
                f"stages ask for {wanted} workers, more than min_workers = {self.min_workers} "
                "(the first plan is made once that many are up): raise --min-workers, or "
                "give the stages fewer workers"
            )
        self.tls.validate(is_server=True)
        check_exposure(self.host, self.auth_token, self.tls, self.insecure)
        if self.auth_token and self.auth_token in self.client_tokens:
            raise ValueError(
                "a client token is the cluster's token (--auth-token-file): give clients "
                "tokens of their own, or none"
            )
        if self.tokenizer:
            load_tokenizer(self.tokenizer)
        self._validate_http()

    @property
    def client_api_tokens(self) -> tuple[str, ...]:
        """The tokens that open the client API (gRPC Generate and Abort, the HTTP API): the
        client tokens and the cluster's; () when it is open."""
        return self.client_tokens + ((self.auth_token,) if self.auth_token else ())

    def _validate_http(self) -> None:
        if self.http_port is None:
            return
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port = {self.http_port}: must be in [0, 65535]")
        if not self.tokenizer:
            raise ValueError(
                "http_port needs a tokenizer (the HTTP API speaks text): set --tokenizer"
            )
        if self.http_max_connections < 1:
            raise ValueError(f"http_max_connections = {self.http_max_connections}: must be >= 1")
        check_seconds("http_request_timeout_s", self.http_request_timeout_s)
        if self.http_max_body_bytes_in_flight < HTTP_MAX_BODY_BYTES:
            raise ValueError(
                f"http_max_body_bytes_in_flight = {self.http_max_body_bytes_in_flight}: must "
                f"be at least one body's bound, {HTTP_MAX_BODY_BYTES}"
            )
        if self.chat_template and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template = {self.chat_template!r} is not a readable file")


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


def _check_workload(workload: str) -> None:
    """A preset name, or a trace file whose every line is a valid request."""
    if workloads.is_workload(workload):
        return
    if not Path(workload).is_file():
        raise workloads.not_found(workload)
    try:
        read_trace(workload)
    except OSError as e:
        raise ValueError(f"workload {workload!r}: cannot read it ({e.strerror})") from None


def _check_stages(stages: tuple[StageSpec, ...]) -> None:
    """The core's rules for a layout (`StageLayout::new`), checked at start: the core checks
    them only once the workers are there, after the servers listen."""
    for k, s in enumerate(stages):
        expected_min = stages[k - 1].max_len if k else 0
        if s.min_len != expected_min:
            raise ValueError(
                f"stages[{k}].min_len = {s.min_len}: must be {expected_min} "
                "(stages start at 0 and are contiguous)"
            )
        if s.max_len <= s.min_len:
            raise ValueError(f"stages[{k}] = [{s.min_len}, {s.max_len}): must be non-empty")
        if s.num_workers < 1:
            raise ValueError(f"stages[{k}] has {s.num_workers} workers: must be >= 1")


def from_toml(path: Path) -> SchedulerConfig:
    """Reads a config file (see services/cascade-scheduler/scheduler.example.toml)."""
    doc = read_toml(path)
    known = {f.name for f in fields(SchedulerConfig)} - {"auth_token", "client_tokens"}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    tls_doc = doc.pop("tls", {})
    if not isinstance(tls_doc, dict):
        raise ValueError(f"{path}: tls must be a table ([tls])")
    check_table(f"{path} [tls]", tls_doc, TlsFiles)
    tls = TlsFiles(**tls_doc)
    if isinstance(doc.get("workers"), list):
        doc["workers"] = tuple(doc["workers"])
    if "stages" in doc:
        doc["stages"] = _stages_from_toml(path, doc["stages"])
    check_types(str(path), doc, SchedulerConfig)
    return SchedulerConfig(**doc, tls=tls)


def _stages_from_toml(path: Path, value: object) -> tuple[StageSpec, ...]:
    """`stages` as the flag writes it ("0-512:2,512-8192:2") or as a list of such parts
    (["0-512:2", "512-8192:2"]); a list ended the daemon with an AttributeError traceback."""
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(
            f"{path}: stages = {value!r}: expected a string 'MIN-MAX:WORKERS,...' or a list "
            "of 'MIN-MAX:WORKERS' strings"
        )
    return parse_stages(value)


def parse_args(argv: list[str] | None) -> SchedulerConfig:
    p = argparse.ArgumentParser(
        prog="cascade-scheduler", description="CascadeInfer's length-aware scheduler."
    )
    p.add_argument("--config", type=Path, help="TOML file; flags override it")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", help="comma-separated worker addresses")
    p.add_argument("--min-workers", type=int, help="start routing once this many workers are known")
    p.add_argument("--policy", choices=POLICY_NAMES)
    p.add_argument("--profile", help="cost profile name or JSON file")
    p.add_argument("--workload", help="preset or trace the initial plan is for")
    p.add_argument("--rate", type=float, help="arrival rate the initial plan is for")
    p.add_argument(
        "--arrival-cv",
        type=float,
        help="burstiness the initial plan is for: coefficient of variation of inter-arrival "
        "gaps (1 = Poisson; default: a trace's own, else 1)",
    )
    p.add_argument("--stages", help="explicit stages MIN-MAX:WORKERS,... instead of a plan")
    p.add_argument("--max-queue", type=int)
    p.add_argument(
        "--max-queue-per-client",
        type=int,
        help="queued requests one client credential may hold (default 0: --max-queue)",
    )
    p.add_argument("--max-prompt-bytes", type=int, help="text prompt size limit (0: from context)")
    p.add_argument("--max-stream-lag-tokens", type=int, help="unread tokens allowed per client")
    p.add_argument(
        "--http-max-connections", type=int, help="open HTTP connections at most (more: 503)"
    )
    p.add_argument(
        "--http-request-timeout-s",
        type=float,
        help="seconds an HTTP request's head, then its body, may take to arrive (else 408)",
    )
    p.add_argument(
        "--http-max-body-bytes-in-flight",
        type=int,
        help="bytes of HTTP request bodies held at once while they arrive, all connections "
        "together (a body past it: 503); default 256 MiB",
    )
    p.add_argument("--tick-interval-s", type=float)
    p.add_argument(
        "--worker-link-timeout-s",
        type=float,
        help="a worker link silent this long (keepalive) is broken: its requests resume elsewhere",
    )
    p.add_argument(
        "--worker-call-timeout-s", type=float, help="seconds a worker may take to answer a call"
    )
    p.add_argument(
        "--migration-timeout-s", type=float, help="seconds a move may take before it is given up"
    )
    p.add_argument("--max-concurrent-migrations", type=int)
    p.add_argument("--max-optional-migrations-per-s", type=float)
    p.add_argument(
        "--no-capacity-guard",
        dest="is_capacity_guarded",
        action="store_const",
        const=False,
        help="keep cascade's stage sizes as planned (no worker moves between stages)",
    )
    p.add_argument(
        "--ttft-slo-s",
        type=float,
        help="first-token service level, fixed part (s; default 1): cascade places new "
        "requests to meet it",
    )
    p.add_argument(
        "--ttft-slo-per-token-s",
        type=float,
        help="first-token service level, per prompt token (s; default 0.0002)",
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus exporter port (0: off)")
    p.add_argument(
        "--health-port", type=int, help="gRPC health for probes without a token (0: off)"
    )
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json for text prompts")
    p.add_argument(
        "--auth-token-file",
        help="file with the cluster's bearer token: workers send it, and clients too unless "
        "--client-tokens-file is given (else $CASCADE_AUTH_TOKEN)",
    )
    p.add_argument(
        "--client-tokens-file",
        help="file with the tokens clients send, one per line; they open the client API only "
        "(else $CASCADE_CLIENT_TOKEN)",
    )
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (0: any free)")
    p.add_argument("--served-model-name", help="model name HTTP clients ask for")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host with no token and no mTLS (anyone reaching it may use it)",
    )
    add_tls_arguments(
        p,
        cert_help="PEM certificate this scheduler serves with",
        ca_help="PEM CA that workers (and, with mTLS, clients) are checked with",
    )
    a = p.parse_args(argv)
    config = from_toml(a.config) if a.config else SchedulerConfig()
    flags: dict[str, Any] = {
        k: getattr(a, k)
        for k in (
            "host",
            "port",
            "policy",
            "profile",
            "workload",
            "rate",
            "arrival_cv",
            "max_queue",
            "max_queue_per_client",
            "max_prompt_bytes",
            "max_stream_lag_tokens",
            "tick_interval_s",
            "worker_link_timeout_s",
            "worker_call_timeout_s",
            "migration_timeout_s",
            "max_concurrent_migrations",
            "max_optional_migrations_per_s",
            "is_capacity_guarded",
            "ttft_slo_s",
            "ttft_slo_per_token_s",
            "metrics_port",
            "health_port",
            "tokenizer",
            "auth_token_file",
            "client_tokens_file",
            "http_port",
            "served_model_name",
            "chat_template",
            "http_max_connections",
            "http_request_timeout_s",
            "http_max_body_bytes_in_flight",
            "insecure",
        )
    }
    if a.workers is not None:
        flags["workers"] = tuple(w for w in a.workers.split(",") if w)
    if a.stages:
        flags["stages"] = parse_stages(a.stages)
    config = replace(config, **{k: v for k, v in flags.items() if v is not None})
    config = replace(
        config,
        tls=tls_from_arguments(config.tls, a),
        min_workers=(
            a.min_workers
            if a.min_workers is not None
            else max(config.min_workers, len(config.workers), 1)
        ),
        auth_token=read_token(config.auth_token_file),
        client_tokens=read_client_tokens(config.client_tokens_file),
    )
    config.validate()
    return config
