"""cascade-worker configuration: a frozen dataclass from a TOML file, overridden by flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cascadeinfer.daemon import check_address, check_distinct_ports, check_port, check_seconds
from cascadeinfer.domain import worker_id_problem
from cascadeinfer.security import (
    TlsFiles,
    add_tls_arguments,
    check_exposure,
    read_token,
    tls_from_arguments,
)
from cascadeinfer.toml_config import check_table, check_types, read_toml
from cascadeinfer.worker.engines.sim_engine import SimEngineConfig


@dataclass(frozen=True)
class WorkerConfig:
    engine: str = "sim"
    """'vllm' or 'sim' (the simulator)."""
    model: str = ""
    """vllm: a model directory or id. Empty: a tiny built-in Llama config with dummy weights."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (printed on start)."""
    worker_id: str = ""
    """Defaults to host:port."""
    metrics_port: int = 0
    """Prometheus HTTP exporter; 0 turns it off."""
    health_port: int = 0
    """gRPC health alone, open to probes without a token (`health_port.py`); 0 turns it off.
    With a token, health on the API port takes one."""
    scheduler: str = ""
    """cascade-scheduler address to register with (and heartbeat to); empty: none."""
    advertise_address: str = ""
    """Address others use to reach this worker; defaults to host:port."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, running requests get this long to finish before they are aborted."""
    link_timeout_s: float = 10.0
    """A link to the scheduler or a peer that answers no keepalive ping for about this long
    counts as broken: a step feed to a scheduler cut off ends (starting the orphan bound), a
    migration to an unreachable target fails and the request resumes here."""
    orphan_timeout_s: float = 30.0
    """Detached requests (a scheduler's) are aborted once no step feed has been open this long:
    their scheduler is gone and nobody will read them. Longer than a scheduler restart."""
    max_import_mib: int = 0
    """KV blocks the migrations coming in may hold in memory together before they land, in MiB;
    0: a quarter of the memory available when each begins (kv_stream.IMPORT_MEMORY_SHARE)."""
    auth_token_file: str = ""
    """File with the cluster's bearer token, else $CASCADE_AUTH_TOKEN: every WorkerService call
    must carry it, and this worker sends it to the scheduler and to peer workers."""
    auth_token: str = field(default="", repr=False)
    """Resolved from auth_token_file or the environment; never logged."""
    insecure: bool = False
    """Serve a non-loopback host with neither a token nor mTLS (refused otherwise)."""
    tls: TlsFiles = field(default_factory=TlsFiles)
    """Serving TLS (mTLS with require_client_cert), and the credentials for outgoing links."""
    sim: SimEngineConfig = field(default_factory=SimEngineConfig)
    vllm: dict[str, Any] = field(default_factory=dict)
    """Extra options for the vLLM engine (see engines/vllm_engine.py)."""

    def validate(self) -> None:
        if self.engine not in ("vllm", "sim"):
            raise ValueError(f"engine = {self.engine!r}: must be 'vllm' or 'sim'")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port = {self.port}: must be in [0, 65535]")
        check_port("metrics_port", self.metrics_port)
        check_port("health_port", self.health_port)
        check_distinct_ports(
            {"port": self.port, "metrics_port": self.metrics_port, "health_port": self.health_port}
        )
        for name in ("scheduler", "advertise_address"):
            if getattr(self, name):
                check_address(name, getattr(self, name))
        if (problem := worker_id_problem(self.worker_id)) is not None:
            raise ValueError(problem)
        check_seconds("drain_timeout_s", self.drain_timeout_s, may_be_zero=True)
        check_seconds("link_timeout_s", self.link_timeout_s)
        check_seconds("orphan_timeout_s", self.orphan_timeout_s)
        if self.max_import_mib < 0:
            raise ValueError(f"max_import_mib = {self.max_import_mib}: must be >= 0")
        # A path, not a hub id, that is not there: vLLM would take it for a malformed repo id
        # and fail after a long import with a page of traceback.
        is_path = self.model.startswith(("/", "./", "../", "~"))
        if self.engine == "vllm" and is_path and not Path(self.model).expanduser().is_dir():
            raise ValueError(f"model = {self.model!r}: no such model directory")
        self.tls.validate(is_server=True)
        check_exposure(self.host, self.auth_token, self.tls, self.insecure)


def from_toml(path: Path) -> WorkerConfig:
    """Reads a config file (see services/cascade-worker/worker.example.toml)."""
    doc = read_toml(path)
    known = {f.name for f in fields(WorkerConfig)} - {"auth_token"}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    tables = {}
    for name, cls in (("sim", SimEngineConfig), ("tls", TlsFiles)):
        table = doc.pop(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {name} must be a table ([{name}])")
        check_table(f"{path} [{name}]", table, cls)
        tables[name] = table
    check_types(str(path), doc, WorkerConfig)
    return WorkerConfig(**doc, sim=SimEngineConfig(**tables["sim"]), tls=TlsFiles(**tables["tls"]))


def parse_args(argv: list[str] | None) -> WorkerConfig:
    p = argparse.ArgumentParser(
        prog="cascade-worker", description="A CascadeInfer worker: one engine behind gRPC."
    )
    p.add_argument("--config", type=Path, help="TOML file; flags override it")
    p.add_argument("--engine", choices=["vllm", "sim"])
    p.add_argument(
        "--model", help="vllm: model directory or id (default: built-in tiny Llama, dummy weights)"
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--worker-id")
    p.add_argument("--metrics-port", type=int)
    p.add_argument(
        "--health-port", type=int, help="gRPC health for probes without a token (0: off)"
    )
    p.add_argument("--drain-timeout-s", type=float)
    p.add_argument(
        "--link-timeout-s",
        type=float,
        help="a link to the scheduler or a peer silent this long (keepalive) counts as broken",
    )
    p.add_argument(
        "--orphan-timeout-s",
        type=float,
        help="abort detached requests once no step feed has followed them this long",
    )
    p.add_argument(
        "--max-import-mib",
        type=int,
        help="KV of incoming migrations held in memory at once, MiB (0: a quarter of available)",
    )
    p.add_argument("--scheduler", help="cascade-scheduler address to register with")
    p.add_argument(
        "--advertise-address", help="address the scheduler and peers use (default host:port)"
    )
    p.add_argument("--load-format", help="vllm: weight loading, e.g. 'dummy' for random weights")
    p.add_argument(
        "--auth-token-file",
        help="the cluster's bearer token, required on every call (else $CASCADE_AUTH_TOKEN)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host with no token and no mTLS (anyone reaching it may use it)",
    )
    add_tls_arguments(
        p,
        cert_help="PEM certificate this worker serves and calls out with",
        ca_help="PEM CA the scheduler and peers are checked with",
    )
    p.add_argument("--sim-profile", help="sim: cost profile name or file")
    p.add_argument("--sim-time-scale", type=float, help="sim: step sleep = predicted time x this")
    p.add_argument("--sim-kv-bytes-per-token", type=int, help="sim: KV payload size per token")
    p.add_argument("--sim-num-blocks", type=int, help="sim: KV capacity in blocks")
    p.add_argument("--sim-max-model-len", type=int)
    p.add_argument("--sim-vocab-size", type=int, help="sim: token ids are drawn below this")
    p.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vllm: an engine option (VALUE as JSON, else a string), e.g. max_model_len=4096; repeatable",
    )
    args = p.parse_args(argv)
    config = from_toml(args.config) if args.config else WorkerConfig()
    top = {
        k: getattr(args, k)
        for k in (
            "engine",
            "model",
            "host",
            "port",
            "worker_id",
            "metrics_port",
            "health_port",
            "drain_timeout_s",
            "orphan_timeout_s",
            "link_timeout_s",
            "max_import_mib",
            "scheduler",
            "advertise_address",
            "auth_token_file",
            "insecure",
        )
    }
    config = replace(config, **{k: v for k, v in top.items() if v is not None})
    sim = {
        "profile": args.sim_profile,
        "time_scale": args.sim_time_scale,
        "kv_bytes_per_token": args.sim_kv_bytes_per_token,
        "num_blocks": args.sim_num_blocks,
        "max_model_len": args.sim_max_model_len,
        "vocab_size": args.sim_vocab_size,
    }
    config = replace(
        config, sim=replace(config.sim, **{k: v for k, v in sim.items() if v is not None})
    )
    if args.load_format:
        args.vllm_option.append(f"load_format={args.load_format}")
    if args.vllm_option:
        config = replace(
            config, vllm={**config.vllm, **dict(parse_engine_option(o) for o in args.vllm_option)}
        )
    config = replace(
        config,
        tls=tls_from_arguments(config.tls, args),
        auth_token=read_token(config.auth_token_file),
    )
    config.validate()
    return config


def parse_engine_option(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' with VALUE as JSON when it parses, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--vllm-option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
