"""Builds the configured engine. vLLM is imported only when asked for."""

from __future__ import annotations

from cascadeinfer.worker.config import WorkerConfig
from cascadeinfer.worker.engine import Engine
from cascadeinfer.worker.engines.sim_engine import SimEngine


def build_engine(config: WorkerConfig) -> Engine:
    if config.engine == "sim":
        return SimEngine(config.sim)
    from cascadeinfer.worker.engines.vllm_engine import build_vllm_engine

    return build_vllm_engine(config.model, config.vllm)
