"""The `Engine` protocol over an in-process vLLM v1 `LLMEngine`, with KV export and import.

This is the only module (besides the connector vLLM loads, `kv_connector.py`) that imports vLLM.
KV blocks move through `CascadeKVConnector`: the engine places orders and bytes in its
`MigrationHub`, and vLLM's own step cycle runs the copies. When the caller needs the bytes now
(`export_kv`, `copy_full_blocks`), the engine runs one transfer step: a vLLM step with the
scheduler paused, so no request decodes in it and only the connector works.

Known limits:
- A migrated or recomputed request becomes a new vLLM request whose prompt is the original
  prompt plus the tokens generated so far, so frequency and presence penalties would count those
  tokens as prompt (`SamplingSpec` has no penalties today), and a seeded sampler restarts its
  random stream: only greedy decoding (temperature 0) is reproduced token for token.
- Several engines can live in one process (tests do this), but vLLM keeps process-global state
  (the KV-connector worker instance, the parallel groups) that an engine's shutdown tears down.
  So `shutdown()` of an engine that is not the last one in the process only aborts its requests;
  the last one shuts every engine down.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from cascadeinfer.scratch_dirs import make_scratch_dir
from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    FinishReason,
    KVLayout,
    KVSnapshot,
    RequestProgress,
    StepReport,
)

# Before anything here loads torch (kv_connector does): see _prepare_cpu_kernels.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

from cascadeinfer.worker.engines import kv_connector as kvc
from cascadeinfer.worker.engines.kv_blocks import block_bytes_of
from cascadeinfer.worker.tiny_model import write_tiny_llama

if TYPE_CHECKING:
    import torch
    from vllm.outputs import RequestOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.request import Request

    from cascadeinfer.worker.engines.vllm_mp_engine import VllmMpEngine

SEEDED_DUMMY_LOAD_FORMAT = "cascade-dummy"
"""Like vLLM's "dummy" load format, but with per-tensor seeds and realistic scales. vLLM's own
dummy weights are so small that greedy output ignores the context (it repeats two tokens), which
would let a broken KV transfer pass unnoticed."""

TINY_MODEL_NAME = "cascade-tiny-llama"
"""The served name of the built-in model: layouts compare names, not temporary paths."""

ModelDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]

_FINISH_REASONS = {"length": FinishReason.LENGTH, "stop": FinishReason.STOP}


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    """A model directory or hub id."""
    served_model_name: str | None = None
    """The name KV layouts compare; defaults to `model`."""
    load_format: str = "auto"
    """vLLM's formats ("auto", "dummy", ...) or SEEDED_DUMMY_LOAD_FORMAT."""
    dtype: ModelDtype = "bfloat16"
    block_size: int = 32
    """Tokens per KV block; the CPU backend needs a multiple of 32."""
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    """Tokens one engine step computes (vLLM's chunked-prefill budget); None leaves vLLM's
    default. A smaller budget cuts a long prompt's prefill into more steps: shorter stalls for
    the decodes beside it, and less activation memory per step."""
    num_blocks: int | None = None
    """Caps the KV pool (vLLM's num_gpu_blocks_override); None sizes it from memory."""
    cpu_kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE, used on CPU hosts."""
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    skip_tokenizer_init: bool = True
    seed: int = 0
    max_transfer_steps: int = 4
    """Steps to wait for the worker to copy blocks before giving up (one is enough normally)."""
    multiprocess: bool = True
    """Run vLLM as operators deploy it (the default): AsyncLLM with the engine core (and its
    workers) in their own processes (`vllm_mp_engine.py`); KV blocks move through
    `mp_kv_connector.py`. False hosts one LLMEngine in the daemon's process (`VllmEngine`),
    which calibration needs (it observes vLLM's scheduler) and which shares the daemon's GIL."""
    tensor_parallel_size: int = 1
    """Multiprocess engine only: workers (GPUs) the model is split over."""
    move_kv: bool = True
    """Multiprocess engine only: load the cross-process KV connector (`mp_kv_connector.py`) so
    migrations can move KV blocks; False leaves vLLM without a connector (recompute only)."""
    kv_peer_host: str = "127.0.0.1"
    """Multiprocess engine with `move_kv`: the address each tensor-parallel rank binds for
    peers' ranks to send it KV directly (rank to rank, TCP, CURVE-encrypted, ticket checked);
    the worker daemon defaults it to its own `host`. "" turns the road off (the blocks then
    pass through both daemons' ImportKV stream)."""
    kv_peer_port: int = 0
    """Rank r binds kv_peer_port + r; 0 lets the system pick a free port for each rank."""
    kv_peer_encrypt: bool = True
    """Encrypt the rank-to-rank channel (ZeroMQ CURVE). False sends KV in the clear, checked
    only by the ticket (itself sent in the clear), for networks the operator trusts: about 2.5x
    the bytes per second per core (`docs/benchmarks.md`)."""
    kv_peer_advertise_host: str = ""
    """The host peers connect to (a name or an address); "" = kv_peer_host. The worker daemon
    defaults it to the host of its `advertise_address`."""

    def validate(self) -> None:
        """ValueError naming the first bad field."""
        checks = [
            (bool(self.model), "model", "must not be empty"),
            (self.dtype in get_args(ModelDtype), "dtype", f"must be one of {get_args(ModelDtype)}"),
            (self.block_size > 0 and self.block_size % 32 == 0, "block_size", "multiple of 32"),
            (self.max_model_len >= 2, "max_model_len", "must be >= 2"),
            (self.num_blocks is None or self.num_blocks >= 2, "num_blocks", "None or >= 2"),
            (
                self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                "max_num_batched_tokens",
                "None or >= 1",
            ),
            (self.cpu_kv_cache_gib >= 1, "cpu_kv_cache_gib", "must be >= 1"),
            (self.max_transfer_steps >= 1, "max_transfer_steps", "must be >= 1"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1"),
            (0 <= self.kv_peer_port <= 65535, "kv_peer_port", "must be in [0, 65535]"),
            (
                self.multiprocess or self.tensor_parallel_size == 1,
                "tensor_parallel_size",
                "> 1 needs multiprocess = true",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"vllm.{name} = {getattr(self, name)!r}: {rule}")


def build_vllm_engine(model: str, options: Mapping[str, Any]) -> VllmEngine | VllmMpEngine:
    """The daemon's entry point. `options` are VllmEngineConfig fields (the `[vllm]` table).
    An empty `model` is the built-in tiny Llama with seeded dummy weights."""
    config = resolve_config(model, options)
    if config.multiprocess:
        from cascadeinfer.worker.engines.vllm_mp_engine import VllmMpEngine

        return VllmMpEngine(config)
    return VllmEngine(config)


def resolve_config(model: str, options: Mapping[str, Any]) -> VllmEngineConfig:
    """The engine configuration the daemon would use (benchmarks build the same)."""
    known = {f.name for f in fields(VllmEngineConfig)} - {"model"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"vllm: unknown options {sorted(unknown)}; known: {sorted(known)}")
    if not model:
        directory = make_scratch_dir("cascade-tiny-llama-")
        # Gone with the process (every worker start left one in /tmp: 225 on the probe's host),
        # or, where it was killed, with the next start's sweep (`make_scratch_dir`).
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        defaults: dict[str, Any] = {
            "served_model_name": TINY_MODEL_NAME,
            "load_format": SEEDED_DUMMY_LOAD_FORMAT,
        }
        options = {**defaults, **options}
        model = str(write_tiny_llama(directory))
    return VllmEngineConfig(model=model, **options)


@dataclass
class _Tracked:
    request: EngineRequest
    internal_id: str
    outputs: list[int]
    """Every output token so far, counted from the request's original start."""


@dataclass
class PromptTally:
    """Prompt tokens of the fresh requests whose first token came since the last StepReport
    (imported and resumed ones bring their KV and are not counted), and of those the ones
    vLLM's prefix cache served (`RequestOutput.num_cached_tokens`)."""

    tokens: int = 0
    cached: int = 0

    def first_output(self, prompt_len: int, num_cached_tokens: int | None) -> None:
        self.tokens += prompt_len
        self.cached += num_cached_tokens or 0

    def take(self) -> tuple[int, int]:
        """The counts so far, starting over."""
        counts = (self.tokens, self.cached)
        self.tokens = self.cached = 0
        return counts


@dataclass
class _Pending:
    """Progress gathered since the last StepReport."""

    first_index: int
    context_len: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class VllmEngine:
    """A vLLM engine in this process, driven one step at a time by the worker's engine thread."""

    def __init__(self, config: VllmEngineConfig) -> None:
        config.validate()
        self._config = config
        self._hub_id = f"vllm-{uuid.uuid4().hex[:12]}"
        self._hub = kvc.open_hub(self._hub_id)
        started = time.perf_counter()
        try:
            self._llm = _build_llm_engine(config, self._hub_id)
        except BaseException:
            kvc.close_hub(self._hub_id)
            raise
        self.start_time_s = time.perf_counter() - started
        self._scheduler = _scheduler_of(self._llm)
        self._layout = _read_layout(self._llm, self._scheduler, config)
        self._vocab_size = self._llm.model_config.get_vocab_size()
        self._tracked: dict[str, _Tracked] = {}
        self._by_internal: dict[str, str] = {}
        self._pending: dict[str, _Pending] = {}
        self._step_index = 0
        self._prompts = PromptTally()

    # ---- Engine protocol: properties ------------------------------------------------------

    @property
    def name(self) -> str:
        return "vllm"

    @property
    def can_move_kv(self) -> bool:
        return True

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def vllm_scheduler(self) -> Scheduler:
        """vLLM's scheduler, for tools that observe batches and limits (calibration); read only."""
        return self._scheduler

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_blocks_total(self) -> int:
        # Block 0 is vLLM's null block and is never handed out.
        return int(self._scheduler.kv_cache_manager.block_pool.num_gpu_blocks) - 1

    def num_free_blocks(self) -> int:
        return int(self._scheduler.kv_cache_manager.block_pool.get_num_free_blocks())

    def has_unfinished(self) -> bool:
        return bool(self._pending) or bool(self._llm.has_unfinished_requests())

    def check_health(self) -> None:
        return  # runs in the daemon's process (uniproc executor): it dies with it

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        self._check_new(request)
        blocks_needed = math.ceil((request.context_len + 1) / self._layout.block_size)
        if blocks_needed > self.num_blocks_total:
            raise EngineError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"context_len = {request.context_len}: needs {blocks_needed} KV blocks, "
                f"the engine has {self.num_blocks_total}",
            )
        self._submit(request, None)

    def abort(self, request_id: str) -> None:
        tracked = self._get(request_id)
        self._llm.abort_request([tracked.internal_id], internal=True)
        self._forget(tracked)

    def step(self) -> StepReport:
        started = time.perf_counter()
        self._absorb(self._llm.step())
        elapsed = time.perf_counter() - started
        progress = tuple(
            RequestProgress(rid, tuple(p.token_ids), p.first_index, p.context_len, p.finish_reason)
            for rid, p in self._pending.items()
        )
        self._pending = {}
        self._step_index += 1
        num_running, num_waiting = self._scheduler.get_request_counts()
        free = self.num_free_blocks()
        prompt = self._prompts.take()
        return StepReport(
            step_index=self._step_index,
            step_time_s=elapsed,
            progress=progress,
            num_running=num_running,
            num_waiting=num_waiting,
            kv_blocks_used=self.num_blocks_total - free,
            kv_blocks_free=free,
            prompt_tokens=prompt[0],
            prompt_tokens_cached=prompt[1],
        )

    # ---- migration ------------------------------------------------------------------------

    def copy_full_blocks(self, request_id: str, start_block: int) -> list[bytes]:
        tracked = self._get(request_id)
        running = self._running_request(tracked)
        if start_block < 0:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, f"start_block = {start_block}: must be >= 0"
            )
        end_block = running.num_computed_tokens // self._layout.block_size
        if start_block >= end_block:
            return []
        self._hub.copy_orders[tracked.internal_id] = (start_block, end_block)
        return self._drive_until_copied(tracked.internal_id)

    def export_kv(self, request_id: str, skip_blocks: int = 0) -> KVSnapshot:
        tracked = self._get(request_id)
        running = self._running_request(tracked)
        num_full = running.num_computed_tokens // self._layout.block_size
        if not 0 <= skip_blocks <= num_full:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"skip_blocks = {skip_blocks}: must be in [0, {num_full}] (full blocks)",
            )
        internal_id = tracked.internal_id
        self._hub.export_orders[internal_id] = skip_blocks
        self._llm.abort_request([internal_id], internal=True)
        capture = self._hub.captured.pop(internal_id, None)
        if capture is None:
            self._hub.export_orders.pop(internal_id, None)
            raise RuntimeError(f"the KV connector did not capture {request_id!r} on abort")
        self._forget(tracked)
        blocks = self._drive_until_copied(internal_id)
        full_request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=tracked.request.prompt_token_ids,
            sampling=tracked.request.sampling,
            output_token_ids=tuple(tracked.outputs),
        )
        if capture.token_ids != full_request.prompt_token_ids + full_request.output_token_ids:
            raise RuntimeError(f"{request_id!r}: vLLM's tokens differ from the reported ones")
        return KVSnapshot(full_request, self._layout, capture.num_computed_tokens, blocks)

    def import_kv(self, snapshot: KVSnapshot) -> None:
        mismatch = self._layout.mismatch(snapshot.layout)
        if mismatch is not None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
        request = snapshot.request
        self._check_new(request)
        check_snapshot(snapshot, self._layout)
        blocks_needed = math.ceil((request.context_len + 1) / self._layout.block_size)
        free = self.num_free_blocks()
        if blocks_needed > free:
            raise EngineError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{request.request_id!r} needs {blocks_needed} KV blocks, {free} are free",
            )
        migration_id = uuid.uuid4().hex
        self._hub.inbox[migration_id] = list(snapshot.blocks)
        params = {
            kvc.MIGRATION_ID_KEY: migration_id,
            kvc.NUM_CACHED_TOKENS_KEY: snapshot.num_cached_tokens,
        }
        try:
            self._submit(request, params)
        except BaseException:
            self._hub.inbox.pop(migration_id, None)
            raise

    def shutdown(self) -> None:
        for tracked in list(self._tracked.values()):
            self.abort(tracked.request.request_id)
        kvc.close_hub(self._hub_id)
        _SHUT_DOWN_LATER.append(self._llm)
        if kvc.num_open_hubs() == 0:
            while _SHUT_DOWN_LATER:
                _SHUT_DOWN_LATER.pop().engine_core.shutdown()

    # ---- helpers --------------------------------------------------------------------------

    def _check_new(self, request: EngineRequest) -> None:
        if request.request_id in self._tracked:
            raise EngineError(
                ErrorCode.ALREADY_EXISTS, f"request_id = {request.request_id!r}: exists"
            )
        validate_request(request, self._vocab_size, self._config.max_model_len)

    def _submit(self, request: EngineRequest, kv_params: dict[str, Any] | None) -> None:
        params = to_sampling_params(request, kv_params)
        prompt = list(request.prompt_token_ids + request.output_token_ids)
        try:
            internal_id = self._llm.add_request(
                request.request_id, {"prompt_token_ids": prompt}, params
            )
        except vllm_refusals() as exc:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, f"vLLM refused the request: {exc}"
            ) from exc
        self._tracked[request.request_id] = _Tracked(
            request, internal_id, list(request.output_token_ids)
        )
        self._by_internal[internal_id] = request.request_id

    def _get(self, request_id: str) -> _Tracked:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {request_id!r}: unknown")
        return tracked

    def _running_request(self, tracked: _Tracked) -> Request:
        from vllm.v1.request import RequestStatus

        request = self._scheduler.requests.get(tracked.internal_id)
        if (
            request is None
            or request.status != RequestStatus.RUNNING
            or request.num_computed_tokens != request.num_tokens - 1
        ):
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION,
                f"request_id = {tracked.request.request_id!r}: not decoding (waiting, "
                "preempted or still in prefill)",
            )
        return request

    def _pending_for(self, tracked: _Tracked) -> _Pending:
        rid = tracked.request.request_id
        pending = self._pending.get(rid)
        if pending is None:
            context_len = len(tracked.request.prompt_token_ids) + len(tracked.outputs)
            pending = _Pending(first_index=len(tracked.outputs), context_len=context_len)
            self._pending[rid] = pending
        return pending

    def _forget(self, tracked: _Tracked) -> None:
        del self._tracked[tracked.request.request_id]
        self._by_internal.pop(tracked.internal_id, None)

    def _absorb(self, outputs: list[Any]) -> None:
        for output in outputs:
            self._absorb_one(output)

    def _absorb_one(self, output: RequestOutput) -> None:
        rid = output.request_id
        tracked = self._tracked.get(rid) or self._tracked.get(self._by_internal.get(rid, ""))
        if tracked is None or not output.outputs:
            return
        completion = output.outputs[0]
        if not tracked.outputs and completion.token_ids:  # a fresh request's first token
            self._prompts.first_output(
                len(tracked.request.prompt_token_ids), output.num_cached_tokens
            )
        pending = self._pending_for(tracked)
        pending.token_ids.extend(completion.token_ids)
        tracked.outputs.extend(completion.token_ids)
        pending.context_len = len(tracked.request.prompt_token_ids) + len(tracked.outputs)
        if output.finished:
            reason = _FINISH_REASONS.get(str(completion.finish_reason), FinishReason.ABORT)
            pending.finish_reason = reason
            self._forget(tracked)

    def _transfer_step(self) -> None:
        """One vLLM step with the scheduler paused: nothing is scheduled, so no request moves
        on, but the KV connector's cycle runs (its pending work keeps the engine stepping)."""
        from vllm.v1.core.sched.interface import PauseState

        self._scheduler.set_pause_state(PauseState.PAUSED_ALL)
        try:
            outputs = self._llm.step()
        finally:
            self._scheduler.set_pause_state(PauseState.UNPAUSED)
        self._absorb(outputs)

    def _drive_until_copied(self, internal_id: str) -> list[bytes]:
        """Runs transfer steps until the worker-side connector has copied the ordered blocks."""
        for _ in range(self._config.max_transfer_steps):
            self._transfer_step()
            blocks = self._hub.outbox.pop(internal_id, None)
            if blocks is not None:
                return blocks
        raise RuntimeError(
            f"the KV connector copied nothing for {internal_id!r} in "
            f"{self._config.max_transfer_steps} steps"
        )


def check_snapshot(snapshot: KVSnapshot, layout: KVLayout) -> None:
    """INVALID_ARGUMENT for a snapshot whose blocks cannot be the request's cache in `layout`
    (both vLLM engines check an import with it before touching the engine)."""
    request = snapshot.request
    if snapshot.num_cached_tokens != request.context_len - 1:
        raise EngineError(
            ErrorCode.INVALID_ARGUMENT,
            f"num_cached_tokens = {snapshot.num_cached_tokens}: must be context_len - 1 "
            f"= {request.context_len - 1}",
        )
    if snapshot.transfer_id is not None:
        if snapshot.blocks:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, "a snapshot sent rank to rank carries no blocks"
            )
        return
    num_blocks = math.ceil(snapshot.num_cached_tokens / layout.block_size)
    if len(snapshot.blocks) != num_blocks:
        raise EngineError(
            ErrorCode.INVALID_ARGUMENT, f"blocks: {len(snapshot.blocks)} given, {num_blocks} needed"
        )
    for i, blob in enumerate(snapshot.blocks):
        if len(blob) != layout.block_bytes:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"blocks[{i}]: {len(blob)} bytes, expected {layout.block_bytes}",
            )


def validate_request(request: EngineRequest, vocab_size: int, max_model_len: int) -> None:
    """INVALID_ARGUMENT naming the first bad field."""
    request.sampling.validate()
    tokens = request.prompt_token_ids + request.output_token_ids
    checks: list[tuple[bool, str]] = [
        (bool(request.request_id), "request_id = '': must not be empty"),
        (bool(request.prompt_token_ids), "prompt_token_ids: must not be empty"),
        (
            all(0 <= t < vocab_size for t in tokens),
            f"prompt_token_ids/output_token_ids: ids must be in [0, {vocab_size})",
        ),
        (
            request.context_len < max_model_len,
            f"context_len = {request.context_len}: must be < max_model_len = {max_model_len}",
        ),
        (
            request.remaining_tokens >= 1,
            f"output_token_ids: {len(request.output_token_ids)} already, max_tokens = "
            f"{request.sampling.max_tokens}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, message)


def vllm_refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses: ValueError, and its own client errors
    (`VLLMValidationError`: stop_token_ids past the vocabulary, a temperature over 2), which
    are no ValueError in vLLM 0.32. Either is INVALID_ARGUMENT for that request; caught as
    anything else it was INTERNAL, which the scheduler retried every half second while the
    client waited, a traceback logged each time."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def to_sampling_params(request: EngineRequest, kv_params: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    spec = request.sampling
    try:
        return SamplingParams(
            max_tokens=request.remaining_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            seed=spec.seed,
            stop_token_ids=list(spec.stop_token_ids),
            ignore_eos=spec.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )
    except vllm_refusals() as exc:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"sampling: {exc}") from exc


# ---- building and inspecting the vLLM engine -----------------------------------------------


def _prepare_cpu_kernels() -> None:
    """Two things vLLM for CPU needs on a host with AMX (this VM moved to one mid-project):

    - Linux kills with SIGILL a process that runs AMX instructions without having requested the
      tile state (arch_prctl ARCH_REQ_XCOMP_PERM). oneDNN requests it when it first uses AMX,
      but a fresh worker reached vLLM's own AMX attention kernel first and died on its first
      step. The request is a no-op where AMX is absent.
    - oneDNN's AMX matrix kernels round differently with the number of rows, so a token whose
      KV is recomputed in a prefill chunk after a migration (the partial last block) differs in
      its last bits from the same token decoded in place, and a greedy run then diverged from
      the unmoved one (token 612 of 1,200 after three migrations). Capping oneDNN at AVX-512
      with BF16, the kernels this worker was validated on, keeps migrations exact; an operator
      who prefers AMX's speed to bit-exact migration sets ONEDNN_MAX_CPU_ISA themselves. oneDNN
      reads it once, when torch loads, so it is set where this module is imported (above).
    """
    import torch

    torch._C._cpu._init_amx()


def _build_llm_engine(config: VllmEngineConfig, hub_id: str) -> LLMEngine:
    # The connector hands bytes to this object in-process: scheduler and worker must live here.
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError(
            "VllmEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (scheduler and worker in this "
            "process, for the KV connector)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
    _prepare_cpu_kernels()
    from vllm import EngineArgs
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.llm_engine import LLMEngine

    if config.load_format == SEEDED_DUMMY_LOAD_FORMAT:
        register_seeded_dummy_loader()
    transfer = KVTransferConfig(
        kv_connector=kvc.CascadeKVConnector.__name__,
        kv_role="kv_both",
        kv_connector_module_path=kvc.__name__,
        kv_connector_extra_config={kvc.HUB_ID_KEY: hub_id},
    )
    args = EngineArgs(
        model=config.model,
        served_model_name=config.served_model_name,
        load_format=config.load_format,
        dtype=config.dtype,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        num_gpu_blocks_override=config.num_blocks,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        skip_tokenizer_init=config.skip_tokenizer_init,
        seed=config.seed,
        async_scheduling=False,
        distributed_executor_backend="uni",
        kv_transfer_config=transfer,
        disable_log_stats=True,
    )
    return LLMEngine.from_engine_args(args)


def _scheduler_of(llm: LLMEngine) -> Scheduler:
    from vllm.v1.core.sched.scheduler import Scheduler

    scheduler = llm.engine_core.engine_core.scheduler  # type: ignore[attr-defined]
    if not isinstance(scheduler, Scheduler):
        raise RuntimeError(f"unexpected vLLM scheduler {type(scheduler).__name__}")
    return scheduler


def _read_layout(llm: LLMEngine, scheduler: Scheduler, config: VllmEngineConfig) -> KVLayout:
    layers = llm.vllm_config.compilation_config.static_forward_context
    caches = kvc.layer_caches_of(layers)
    groups = scheduler.kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"KV migration supports one KV cache group, the model has {len(groups)}")
    spec: Any = groups[0].kv_cache_spec
    attention = layers[groups[0].layer_names[0]]
    backend = attention.attn_backend.get_name()
    isa = getattr(attention, "isa", None)
    num_blocks = scheduler.kv_cache_config.num_blocks
    return KVLayout(
        model=config.served_model_name or config.model,
        dtype=str(spec.dtype).removeprefix("torch."),
        num_layers=len(caches),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        block_size=int(spec.block_size),
        backend=f"{backend}/{isa}" if isa else backend,
        block_bytes=block_bytes_of(caches, num_blocks),
    )


_SHUT_DOWN_LATER: list[LLMEngine] = []
"""Engines stopped while others still run in this process (see the module docstring). Holding
them also keeps vLLM's finalizers, which would tear the shared state down, from running."""


_seeded_loader_registered = False


def register_seeded_dummy_loader() -> None:
    global _seeded_loader_registered
    if _seeded_loader_registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    class SeededDummyLoader(DummyModelLoader):
        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            for name, param in model.named_parameters():
                _seeded_init(name, param.data)

    register_model_loader(SEEDED_DUMMY_LOAD_FORMAT)(SeededDummyLoader)
    _seeded_loader_registered = True


def _seeded_init(name: str, tensor: torch.Tensor) -> None:
    """Norm weights near 1, embeddings ~N(0, 1), matrices ~N(0, 1/fan_in): activations keep
    their scale through the layers, so outputs depend on the whole context."""
    import torch

    if not torch.is_floating_point(tensor):
        return
    generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=generator)
    if tensor.dim() == 1:
        values = 1.0 + 0.1 * noise
    elif "embed" in name:
        values = noise
    else:
        values = noise / math.sqrt(tensor.shape[-1])
    tensor.copy_(values.to(tensor.dtype))
