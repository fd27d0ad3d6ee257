"""Builds the configured engine. vLLM is imported only when asked for."""

from __future__ import annotations

from typing import Any

from cascadeinfer.worker.config import WorkerConfig
from cascadeinfer.worker.engine import Engine
from cascadeinfer.worker.engines.sim_engine import SimEngine


def build_engine(config: WorkerConfig) -> Engine:
    if config.engine == "sim":
        return SimEngine(config.sim)
    from cascadeinfer.worker.engines.vllm_engine import build_vllm_engine

    return build_vllm_engine(config.model, vllm_options(config))


def vllm_options(config: WorkerConfig) -> dict[str, Any]:
    """The `[vllm]` table; unless it says otherwise, the ranks' rank-to-rank side channel
    listens where the daemon's gRPC port does and is reached as the daemon is (the host of
    `advertise_address`), so it is as exposed as the port whose GetInfo hands it out."""
    options = dict(config.vllm)
    if "kv_peer_host" not in options:
        options["kv_peer_host"] = config.host
        advertised = config.advertise_address.rsplit(":", 1)[0].strip("[]")
        options.setdefault("kv_peer_advertise_host", advertised or config.host)
    return options
