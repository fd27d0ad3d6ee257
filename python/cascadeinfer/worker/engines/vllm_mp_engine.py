"""The `Engine` protocol over vLLM's AsyncLLM, with the engine core in its own process.

This is how vLLM runs in production: the daemon's process only turns requests into engine-core
inputs and engine-core outputs into tokens; scheduling and the model run in the engine-core
process (and its worker processes, one per tensor-parallel rank), so they no longer share the
daemon's GIL with the gRPC server. Only vLLM's public client API is used: `AsyncLLM`
(`add_request`, `abort`), the `RequestOutput`s it hands out, and a stat logger for the
scheduler's counts and KV usage.

The worker's engine thread drives this object like the in-process engine: every method runs on
that thread, which owns a private asyncio loop for AsyncLLM. `step()` runs that loop until the
engine core has sent one more batch of outputs (the stat logger sees each batch), then takes
each running request's new tokens in one pass. The engine core does not wait for the daemon:
it schedules its next step while the daemon handles the last one.

Migration with `move_kv` (the default): KV blocks leave and enter vLLM's worker processes
through `mp_kv_connector.py` and its side channels (`mp_kv_channel.py`): `export_kv` orders the
engine core to stop the request, collects its final tokens from the request's last output and
its blocks from every rank; `import_kv` sends a snapshot's blocks to the ranks and adds the
request with a migration id; `copy_full_blocks` has the ranks send a request's full blocks
while vLLM goes on decoding it (the pre-copy). Between two such engines the blocks go rank to
rank instead (`send_full_blocks`, `export_kv_to`; `RankToRankKV` in engine.py): each rank sends
its shard to the peer's rank over TCP and the daemons see only delivery notes. Without `move_kv`, recompute only: `export_kv` returns the tokens
without blocks, and `copy_full_blocks` (and importing blocks) is refused with
FAILED_PRECONDITION before anything is stopped. Known limits as in `vllm_engine.py` (greedy
decoding is reproduced exactly; penalties and seeded sampling are not).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    FinishReason,
    KVLayout,
    KVPeer,
    KVSnapshot,
    KVTransfer,
    RequestProgress,
    StepReport,
)
from cascadeinfer.worker.engines import mp_kv_connector as mkc
from cascadeinfer.worker.engines.mp_kv_channel import KVChannel
from cascadeinfer.worker.engines.parent_watch import mark_daemon
from cascadeinfer.worker.engines.vllm_engine import (
    SEEDED_DUMMY_LOAD_FORMAT,
    PromptTally,
    VllmEngineConfig,
    check_snapshot,
    register_seeded_dummy_loader,
    to_sampling_params,
    validate_request,
    vllm_refusals,
)

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector
    from vllm.v1.metrics.stats import SchedulerStats

log = structlog.get_logger(__name__)
_FINISH_REASONS = {"length": FinishReason.LENGTH, "stop": FinishReason.STOP}
_EXPORT_TIMEOUT_S = 30.0
"""Longest an export waits for the stopped request's last output and for its blocks."""
_BATCH_WAIT_S = 0.05
"""Longest a step waits for the engine core's next batch before returning (so the engine
thread can run the daemon's commands meanwhile)."""
MP_BACKEND_SUFFIX = "+mp-recompute-only"
"""Appended to the layout's backend: a KV-mode peer sees at once that these blocks cannot move."""


@dataclass
class _Tracked:
    request: EngineRequest
    collector: RequestOutputCollector
    outputs: list[int]
    """Every output token so far, counted from the request's original start."""


@dataclass
class _Batches:
    """What the stat logger saw since the last step: one entry per engine-core output batch."""

    num_batches: int = 0
    stats: SchedulerStats | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class VllmMpEngine:
    """AsyncLLM with the engine core in its own process, driven by the worker's engine thread."""

    def __init__(self, config: VllmEngineConfig) -> None:
        config.validate()
        self._config = config
        self._aloop = asyncio.new_event_loop()
        self._batches = _Batches()
        self._channel = (
            KVChannel(
                config.tensor_parallel_size,
                config.kv_peer_host or None,
                config.kv_peer_port,
                config.kv_peer_advertise_host,
                config.kv_peer_encrypt,
            )
            if config.move_kv
            else None
        )
        mark_daemon()  # the engine core and its workers end with this process (parent_watch.py)
        started = time.perf_counter()
        try:
            self._llm = self._aloop.run_until_complete(_start(config, self._batches, self._channel))
        except BaseException:
            self._aloop.close()
            if self._channel is not None:
                self._channel.close()
            raise
        if self._channel is not None:
            self._channel.connect()
        self.start_time_s = time.perf_counter() - started
        # The engine core reports its pool size back to the client; block 0 is the null block.
        self._num_blocks_total = int(self._llm.vllm_config.cache_config.num_gpu_blocks or 1) - 1
        self._layout = _layout_of(self._llm, config, self._channel is not None)
        self._vocab_size = self._llm.model_config.get_vocab_size()
        self._tracked: dict[str, _Tracked] = {}
        self._pending: dict[str, RequestProgress] = {}
        """Progress taken out of collectors between steps (before an export or abort)."""
        self._step_index = 0
        self._prompts = PromptTally()

    # ---- Engine protocol: properties ------------------------------------------------------

    @property
    def name(self) -> str:
        return "vllm"

    @property
    def can_move_kv(self) -> bool:
        return self._channel is not None

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_peer(self) -> KVPeer | None:
        return self._channel.peer if self._channel is not None else None

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_blocks_total(self) -> int:
        return self._num_blocks_total

    def num_free_blocks(self) -> int:
        if not self._tracked:
            # Nothing holds a block (cached prefixes sit in vLLM's free queue).
            return self._num_blocks_total
        stats = self._batches.stats
        usage = stats.kv_cache_usage if stats is not None else 0.0
        return self._num_blocks_total - round(usage * self._num_blocks_total)

    def has_unfinished(self) -> bool:
        return bool(self._tracked) or bool(self._pending)

    def check_health(self) -> None:
        """vLLM marks its client dead once the engine core process is gone (a monitor thread
        watches it) or its output handler failed (the engine core reported its model worker
        dead, or its socket broke); the engine core does not outlive its model worker."""
        if self._llm.errored:
            raise self._llm.dead_error

    def engine_core_pids(self) -> list[int]:
        """Process ids of vLLM's workers (tests check they are not this process)."""
        pids = self._aloop.run_until_complete(self._llm.collective_rpc("cascade_ping"))
        return [int(p) for p in pids]

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        self._check_new(request)
        blocks_needed = math.ceil((request.context_len + 1) / self._layout.block_size)
        if blocks_needed > self._num_blocks_total:
            raise EngineError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"context_len = {request.context_len}: needs {blocks_needed} KV blocks, "
                f"the engine has {self._num_blocks_total}",
            )
        self._submit(request, {mkc.TAG_KEY: request.request_id})

    def _submit(self, request: EngineRequest, kv_params: dict[str, Any]) -> None:
        params = to_sampling_params(request, kv_params if self._channel is not None else None)
        prompt = list(request.prompt_token_ids + request.output_token_ids)
        try:
            collector = self._aloop.run_until_complete(
                self._llm.add_request(request.request_id, {"prompt_token_ids": prompt}, params)
            )
        except vllm_refusals() as exc:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, f"vLLM refused the request: {exc}"
            ) from exc
        self._tracked[request.request_id] = _Tracked(
            request, collector, list(request.output_token_ids)
        )

    def abort(self, request_id: str) -> None:
        tracked = self._get(request_id)
        self._stop(tracked)

    def step(self) -> StepReport:
        started = time.perf_counter()
        if not self._pending:
            self._aloop.run_until_complete(self._next_batch())
        for tracked in list(self._tracked.values()):
            self._take(tracked)
        progress, self._pending = tuple(self._pending.values()), {}
        self._step_index += 1
        stats = self._batches.stats
        free = self.num_free_blocks()
        prompt = self._prompts.take()
        return StepReport(
            step_index=self._step_index,
            step_time_s=time.perf_counter() - started,
            progress=progress,
            num_running=stats.num_running_reqs if stats is not None else 0,
            num_waiting=stats.num_waiting_reqs if stats is not None else 0,
            kv_blocks_used=self._num_blocks_total - free,
            kv_blocks_free=free,
            prompt_tokens=prompt[0],
            prompt_tokens_cached=prompt[1],
        )

    # ---- migration --------------------------------------------------------------------------

    def copy_full_blocks(self, request_id: str, start_block: int) -> list[bytes]:
        """The request's full blocks from start_block on, copied by the ranks while the engine
        core goes on decoding it (this thread waits; vLLM does not)."""
        channel, order, wait_s = self._order_copy(request_id, start_block, None)
        return channel.receive_export(order, wait_s)

    def send_full_blocks(self, request_id: str, start_block: int, transfer: KVTransfer) -> int:
        """`copy_full_blocks`, each rank sending its shard to the peer's rank of its number."""
        channel, order, wait_s = self._order_copy(request_id, start_block, transfer)
        return channel.receive_delivered(order, wait_s)

    def _blocks_wait_s(self, num_blocks: int) -> float:
        """How long to wait for `num_blocks` blocks to be copied or delivered: longer than a
        rank waits for its peer (`mkc.PEER_ACK_TIMEOUT_S`), and growing with the bytes."""
        num_bytes = max(num_blocks, 0) * self._layout.block_bytes
        return mkc.transfer_wait_s(_EXPORT_TIMEOUT_S, num_bytes)

    def _order_copy(
        self, request_id: str, start_block: int, transfer: KVTransfer | None
    ) -> tuple[KVChannel, str, float]:
        """Orders the ranks to copy; returns the channel, the order's id and how long to wait
        for it (the blocks full now, and one more that fills meanwhile)."""
        tracked = self._get(request_id)
        if self._channel is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, _NO_KV_MOVES)
        if start_block < 0:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, f"start_block = {start_block}: must be >= 0"
            )
        self._require_decoding(tracked)
        num_cached = len(tracked.request.prompt_token_ids) + len(tracked.outputs)
        wait_s = self._blocks_wait_s(num_cached // self._layout.block_size + 1 - start_block)
        return self._channel, self._channel.copy(request_id, start_block, transfer), wait_s

    def export_kv(self, request_id: str, skip_blocks: int = 0) -> KVSnapshot:
        """Stops the request and returns its tokens, with its KV blocks under `move_kv` (the
        first skip_blocks left out: copied already)."""
        tracked = self._get(request_id)
        if self._channel is not None:
            return self._export_with_kv(tracked, self._channel, skip_blocks, None)
        if skip_blocks != 0:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, f"skip_blocks = {skip_blocks}: {_NO_KV_MOVES}"
            )
        # Tokens the engine core computed after this point are dropped and computed again by
        # whoever resumes the request: greedy decoding yields the same ones.
        self._take(tracked)
        if request_id not in self._tracked:
            # It finished on its own (its finish is in _pending, for the next step).
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {request_id!r}: finished")
        # What _take found (outputs let into the collector by a command since the last step)
        # is in the snapshot: the target resumes after it, so the next step delivers it here.
        taken = self._pending.get(request_id)
        self._stop(tracked)
        if taken is not None:
            self._pending[request_id] = taken
        request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=tracked.request.prompt_token_ids,
            sampling=tracked.request.sampling,
            output_token_ids=tuple(tracked.outputs),
        )
        return KVSnapshot(request, self._layout, 0, [])

    def export_kv_to(self, request_id: str, skip_blocks: int, transfer: KVTransfer) -> KVSnapshot:
        """`export_kv`, each rank sending its shard to the peer's rank of its number: the
        snapshot has no blocks and `transfer_id` set (no cached tokens where a rank could not
        deliver them: the request then resumes by recompute)."""
        tracked = self._get(request_id)
        if self._channel is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, _NO_KV_MOVES)
        return self._export_with_kv(tracked, self._channel, skip_blocks, transfer)

    def import_kv(self, snapshot: KVSnapshot) -> None:
        """Resumes a snapshot: its blocks go to the ranks first (without `move_kv`, a snapshot
        with blocks is refused and one without is recomputed)."""
        if not snapshot.num_cached_tokens:
            # No cached tokens: recompute (pre-copied blocks of an export that then broke
            # are not enough to resume from).
            self.add_request(snapshot.request)
            return
        if self._channel is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, _NO_KV_MOVES)
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
        if snapshot.transfer_id is not None:
            migration_id = snapshot.transfer_id  # the peer's ranks sent ours the blocks
        else:
            migration_id = uuid.uuid4().hex
            self._channel.send_import(migration_id, snapshot.blocks)
        self._submit(
            request,
            {
                mkc.TAG_KEY: request.request_id,
                mkc.MIGRATION_ID_KEY: migration_id,
                mkc.NUM_CACHED_TOKENS_KEY: snapshot.num_cached_tokens,
            },
        )

    def _require_decoding(self, tracked: _Tracked) -> None:
        """The connector learns of a request when vLLM schedules it: refuse one not yet."""
        rid = tracked.request.request_id
        self._take(tracked)
        if rid not in self._tracked:
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {rid!r}: finished")
        if len(tracked.outputs) == len(tracked.request.output_token_ids):
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION,
                f"request_id = {rid!r}: not decoding yet (waiting or in prefill)",
            )

    def _export_with_kv(
        self, tracked: _Tracked, channel: KVChannel, skip: int, transfer: KVTransfer | None
    ) -> KVSnapshot:
        rid = tracked.request.request_id
        self._require_decoding(tracked)
        # Tokens with KV now: every token but the last sampled one.
        num_cached = len(tracked.request.prompt_token_ids) + len(tracked.outputs) - 1
        num_full = num_cached // self._layout.block_size
        if not 0 <= skip <= num_full:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"skip_blocks = {skip}: must be in [0, {num_full}] (full blocks)",
            )
        order = channel.stop(rid, skip, transfer)
        params = self._take_until_finished(tracked)
        if params is None or mkc.NUM_CACHED_TOKENS_KEY not in params:
            # It finished on its own before the stop took effect: report that finish.
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {rid!r}: finished")
        blocks: list[bytes] | None = []
        try:
            wait_s = self._blocks_wait_s(num_full + 1 - skip)
            if transfer is None:
                blocks = channel.receive_export(order, wait_s)
            else:
                channel.receive_delivered(order, wait_s)
        except RuntimeError as exc:
            # The side channel broke after the stop: the request is resumed by recompute
            # (a snapshot with no cached tokens), never lost.
            log.warning("kv_export_incomplete_recompute", request_id=rid, error=str(exc))
            blocks = None
        request = EngineRequest(
            request_id=rid,
            prompt_token_ids=tracked.request.prompt_token_ids,
            sampling=tracked.request.sampling,
            output_token_ids=tuple(tracked.outputs),
        )
        if request.remaining_tokens < 1:
            self._pending[rid] = replace(self._pending[rid], finish_reason=FinishReason.LENGTH)
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {rid!r}: finished")
        if blocks is None:
            return KVSnapshot(request, self._layout, 0, [])
        num_cached = int(params[mkc.NUM_CACHED_TOKENS_KEY])
        if num_cached != request.context_len - 1:
            raise RuntimeError(f"{rid!r}: vLLM cached {num_cached} tokens of {request.context_len}")
        transfer_id = transfer.transfer_id if transfer is not None else None
        return KVSnapshot(request, self._layout, num_cached, blocks, transfer_id)

    def _take_until_finished(self, tracked: _Tracked) -> dict[str, Any] | None:
        """Moves a stopping request's outputs into `_pending` (as progress: it does not end
        here) until its last one; returns that output's kv_transfer_params."""
        rid = tracked.request.request_id
        deadline = time.monotonic() + _EXPORT_TIMEOUT_S
        while True:
            output: RequestOutput | None = tracked.collector.get_nowait()  # type: ignore[assignment]
            if output is not None and output.outputs:
                completion = output.outputs[0]
                earlier = self._pending.get(rid)
                first = earlier.first_index if earlier else len(tracked.outputs)
                tracked.outputs.extend(completion.token_ids)
                context_len = len(tracked.request.prompt_token_ids) + len(tracked.outputs)
                new = tuple(tracked.outputs[first:])
                finished_alone = output.finished and not (
                    output.kv_transfer_params
                    and mkc.NUM_CACHED_TOKENS_KEY in output.kv_transfer_params
                )
                reason = None
                if finished_alone:
                    reason = _FINISH_REASONS.get(str(completion.finish_reason), FinishReason.ABORT)
                self._pending[rid] = RequestProgress(rid, new, first, context_len, reason)
            if output is not None and output.finished:
                del self._tracked[rid]
                tracked.collector.close()  # type: ignore[no-untyped-call]
                return output.kv_transfer_params
            if time.monotonic() > deadline:
                raise RuntimeError(f"{rid!r} did not stop within {_EXPORT_TIMEOUT_S} s")
            self._aloop.run_until_complete(self._next_batch())

    def shutdown(self) -> None:
        if not self._llm.errored:  # a dead engine has nothing to abort
            for tracked in list(self._tracked.values()):
                self._stop(tracked)
        self._llm.shutdown()
        # Dropped now, while the interpreter is whole: AsyncLLM's finalizer shuts down again.
        del self._llm
        _close_loop(self._aloop)
        if self._channel is not None:
            self._channel.close()

    # ---- helpers --------------------------------------------------------------------------

    async def _next_batch(self) -> None:
        """Returns once the output handler has processed another engine-core batch, or after
        _BATCH_WAIT_S (the engine may be busy with a long prefill)."""
        arrived = self._batches.arrived
        if not arrived.is_set():
            try:
                await asyncio.wait_for(arrived.wait(), _BATCH_WAIT_S)
            except TimeoutError:
                return
        arrived.clear()

    def _take(self, tracked: _Tracked) -> None:
        """Moves a request's undelivered output into `_pending` (one pass per step)."""
        output: RequestOutput | None = tracked.collector.get_nowait()  # type: ignore[assignment]
        if output is None or not output.outputs:
            return
        rid = tracked.request.request_id
        completion = output.outputs[0]
        if not tracked.outputs and completion.token_ids:  # a fresh request's first token
            self._prompts.first_output(
                len(tracked.request.prompt_token_ids), output.num_cached_tokens
            )
        earlier = self._pending.get(rid)
        first_index = earlier.first_index if earlier else len(tracked.outputs)
        tracked.outputs.extend(completion.token_ids)
        reason = None
        if output.finished:
            reason = _FINISH_REASONS.get(str(completion.finish_reason), FinishReason.ABORT)
            del self._tracked[rid]
        new_tokens = tracked.outputs[first_index:]
        self._pending[rid] = RequestProgress(
            rid,
            tuple(new_tokens),
            first_index,
            len(tracked.request.prompt_token_ids) + len(tracked.outputs),
            reason,
        )

    def _stop(self, tracked: _Tracked) -> None:
        rid = tracked.request.request_id
        self._tracked.pop(rid, None)
        self._pending.pop(rid, None)
        tracked.collector.close()  # type: ignore[no-untyped-call]
        self._aloop.run_until_complete(self._llm.abort(rid))

    def _check_new(self, request: EngineRequest) -> None:
        if request.request_id in self._tracked:
            raise EngineError(
                ErrorCode.ALREADY_EXISTS, f"request_id = {request.request_id!r}: exists"
            )
        validate_request(request, self._vocab_size, self._config.max_model_len)

    def _get(self, request_id: str) -> _Tracked:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"request_id = {request_id!r}: unknown")
        return tracked


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Lets AsyncLLM's background tasks (output handler, socket reader) end before closing."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:  # gather() of nothing would look for the calling thread's loop
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


_NO_KV_MOVES = (
    "the multiprocess vLLM engine moves requests in recompute mode only (KV blocks stay in the "
    "engine-core process); use MIGRATION_MODE_RECOMPUTE"
)


async def _start(
    config: VllmEngineConfig, batches: _Batches, channel: KVChannel | None
) -> AsyncLLM:
    """Builds AsyncLLM inside the private loop, so its output handler runs on that loop."""
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_args(config)
    if channel is not None:
        args.kv_transfer_config = KVTransferConfig(
            kv_connector=mkc.CascadeMpConnector.__name__,
            kv_role="kv_both",
            kv_connector_module_path=mkc.__name__,
            kv_connector_extra_config=channel.extra_config(),
            # A load whose bytes did not arrive recomputes those tokens instead of failing.
            kv_load_failure_policy="recompute",
        )
    return AsyncLLM.from_engine_args(args, stat_loggers=[_batch_logger_factory(batches)])


def engine_args(config: VllmEngineConfig) -> AsyncEngineArgs:
    """vLLM's arguments for `config` (benchmarks drive AsyncLLM directly with the same)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
    from vllm import AsyncEngineArgs

    if config.load_format == SEEDED_DUMMY_LOAD_FORMAT:
        register_seeded_dummy_loader()
    return AsyncEngineArgs(
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
        tensor_parallel_size=config.tensor_parallel_size,
        worker_extension_cls=f"{__package__}.vllm_worker_ext.CascadeWorkerExtension",
        disable_log_stats=True,
        enable_log_requests=False,
    )


def _batch_logger_factory(batches: _Batches) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class BatchLogger(StatLoggerBase):
        """Called by AsyncLLM's output handler once per engine-core batch, after its outputs
        reached the request collectors."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._batches = batches

        def record(
            self,
            scheduler_stats: SchedulerStats | None,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                self._batches.stats = scheduler_stats
            self._batches.num_batches += 1
            self._batches.arrived.set()

        def log_engine_initialized(self) -> None:
            return

    return BatchLogger


def _layout_of(llm: AsyncLLM, config: VllmEngineConfig, moves_kv: bool) -> KVLayout:
    """The KV geometry from the model config (the tensors live in other processes)."""
    model_config = llm.model_config
    parallel = llm.vllm_config.parallel_config
    num_layers = model_config.get_num_layers(parallel)
    # Per rank; a block's bytes are every rank's shard, joined.
    num_kv_heads = model_config.get_num_kv_heads(parallel) * parallel.tensor_parallel_size
    head_size = model_config.get_head_size()
    dtype = str(model_config.dtype).removeprefix("torch.")
    itemsize = {"float32": 4}.get(dtype, 2)
    block_size = int(llm.vllm_config.cache_config.block_size)
    return KVLayout(
        model=config.served_model_name or config.model,
        dtype=dtype,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        backend=f"vllm-mp-tp{parallel.tensor_parallel_size}"
        + ("" if moves_kv else MP_BACKEND_SUFFIX),
        block_bytes=num_layers * num_kv_heads * block_size * 2 * head_size * itemsize,
    )
