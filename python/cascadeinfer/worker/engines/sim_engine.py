"""The `sim` engine: a SIMULATED inference engine for load tests and large experiments.

It is not a model. It runs continuous batching with a token budget per step, chunked prefill,
KV block accounting with preemption, and sleeps each step for the time the core's cost model
predicts. Output tokens are deterministic pseudo-tokens that depend only on the prompt and the
output index, so a request produces the same tokens wherever it runs, moved or not. KV blocks
are real byte strings of a realistic size whose content is derived from the tokens they hold,
so a migration costs real transfer time and an import can verify what it received.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field

from cascadeinfer.domain import check_context_fits
from cascadeinfer.planning import load_profile
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

MIN_MAX_MODEL_LEN = 8
"""Shortest sim model length: the daemon's warm-up request (a 4-token prompt, 2 tokens out)
must fit (1-4 ended the worker at warm-up with a traceback)."""
MAX_COUNT = 2**31 - 1
"""Largest sim count (length, blocks, bytes per token, vocabulary): the worker's messages carry
them in 32 bits."""


@dataclass(frozen=True)
class SimEngineConfig:
    profile: str = "gpu-h100-llama3-8b"
    """Cost profile (built-in name or JSON file): step times, KV capacity, batch limits."""
    time_scale: float = 1.0
    """Each step sleeps its predicted time times this (0: as fast as possible)."""
    kv_bytes_per_token: int | None = None
    """Overrides the profile's KV bytes per token (smaller payloads for tests)."""
    num_blocks: int | None = None
    """Overrides the profile's KV capacity, in blocks."""
    max_model_len: int | None = None
    vocab_size: int = 32_000
    model: str = "sim"

    def __post_init__(self) -> None:
        # A non-positive block count or length would leave the engine unable to run anything:
        # the warm-up request would wait for blocks forever, the daemon silent. Past 32 bits
        # the worker said it served, then died registering ("Value out of range").
        lowest = {"max_model_len": MIN_MAX_MODEL_LEN, "vocab_size": 2}
        for name in ("kv_bytes_per_token", "num_blocks", "max_model_len", "vocab_size"):
            value = getattr(self, name)
            low = lowest.get(name, 1)
            if value is not None and not low <= value <= MAX_COUNT:
                raise ValueError(f"sim {name} = {value}: must be in [{low}, {MAX_COUNT}]")
        if not (math.isfinite(self.time_scale) and self.time_scale >= 0):
            raise ValueError(f"sim time_scale = {self.time_scale}: must be finite and >= 0")


@dataclass(frozen=True)
class SimStepCost:
    """One step's batch as the cost model saw it, and the time it predicted."""

    num_decode: int
    sum_context: int
    max_context: int
    prefill_tokens: int
    prefill_pairs: int
    step_time_s: float


@dataclass
class _SimRequest:
    request: EngineRequest
    output: list[int]
    num_computed: int = 0
    """Tokens of prompt + output whose KV exists."""
    num_blocks: int = 0
    digest: bytes = b""

    @property
    def context_len(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output)

    @property
    def tokens(self) -> tuple[int, ...]:
        return (*self.request.prompt_token_ids, *self.output)

    @property
    def is_prefilling(self) -> bool:
        # A request decodes once everything but its last sampled token has KV.
        return self.num_computed < self.context_len - (1 if self.output else 0)


@dataclass
class _Batch:
    decode: list[_SimRequest] = field(default_factory=list)
    prefill: list[tuple[_SimRequest, int]] = field(default_factory=list)


class SimEngine:
    """A simulated engine (see the module docstring). Single-threaded by contract."""

    def __init__(self, config: SimEngineConfig) -> None:
        self.config = config
        self.profile = load_profile(config.profile)
        doc: dict[str, float] = json.loads(self.profile.to_json())
        self.block_size = int(doc["kv_block_size"])
        self.max_num_seqs = int(doc["max_num_seqs"])
        self.max_batch_tokens = int(doc["max_batch_tokens"])
        self._max_model_len = config.max_model_len or int(doc["max_model_len"])
        bytes_per_token = config.kv_bytes_per_token or int(doc["kv_bytes_per_token"])
        self._num_blocks = config.num_blocks or int(doc["kv_capacity_tokens"]) // self.block_size
        self._layout = KVLayout(
            model=config.model,
            dtype="sim",
            num_layers=1,
            num_kv_heads=1,
            head_size=1,
            block_size=self.block_size,
            backend="sim",
            block_bytes=bytes_per_token * self.block_size,
        )
        self._free_blocks = self._num_blocks
        self._requests: dict[str, _SimRequest] = {}
        self._waiting: deque[_SimRequest] = deque()
        self._running: list[_SimRequest] = []
        self._step_index = 0
        self.last_step_cost: SimStepCost | None = None
        """The batch the last step priced and its modelled time (calibration reads it)."""

    # --- Engine protocol: properties -------------------------------------------------------
    @property
    def name(self) -> str:
        return "sim"

    @property
    def can_move_kv(self) -> bool:
        return True

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_blocks_total(self) -> int:
        return self._num_blocks

    def num_free_blocks(self) -> int:
        return self._free_blocks

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def check_health(self) -> None:
        return  # runs in the daemon's process: it dies with it

    # --- requests --------------------------------------------------------------------------
    def _validate(self, request: EngineRequest) -> None:
        request.sampling.validate()
        if request.request_id in self._requests:
            raise EngineError(
                ErrorCode.ALREADY_EXISTS, f"request id {request.request_id!r} is in use"
            )
        if not request.prompt_token_ids:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        check_context_fits(request.context_len, self._max_model_len)
        if request.remaining_tokens < 1:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT, "output_token_ids already reach max_tokens"
            )
        # Stop ids too, as vLLM refuses them (a 400 through the HTTP front); taken, they
        # never matched.
        for what, ids in [
            ("token id", request.prompt_token_ids),
            ("stop_token_ids: id", request.sampling.stop_token_ids),
        ]:
            bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT, f"{what} {bad} is outside the vocabulary"
                )

    def add_request(self, request: EngineRequest) -> None:
        self._validate(request)
        sim = _SimRequest(
            request, list(request.output_token_ids), digest=_digest(request.prompt_token_ids)
        )
        self._requests[request.request_id] = sim
        self._waiting.append(sim)

    def abort(self, request_id: str) -> None:
        sim = self._lookup(request_id)
        self._remove(sim)

    def _lookup(self, request_id: str) -> _SimRequest:
        sim = self._requests.get(request_id)
        if sim is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"no request {request_id!r} on this worker")
        return sim

    def _remove(self, sim: _SimRequest) -> None:
        self._free_blocks += sim.num_blocks
        sim.num_blocks = 0
        del self._requests[sim.request.request_id]
        if sim in self._running:
            self._running.remove(sim)
        else:
            self._waiting.remove(sim)

    # --- stepping --------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _grow(self, sim: _SimRequest, tokens: int) -> bool:
        """Allocates blocks so `tokens` tokens fit; False when the pool is short."""
        need = self._blocks_for(tokens) - sim.num_blocks
        if need > self._free_blocks:
            return False
        self._free_blocks -= max(need, 0)
        sim.num_blocks += max(need, 0)
        return True

    def _preempt_last(self) -> bool:
        """Frees the most recently started running request (recomputed later, like vLLM)."""
        if not self._running:
            return False
        victim = self._running.pop()
        self._free_blocks += victim.num_blocks
        victim.num_blocks = 0
        victim.num_computed = 0
        self._waiting.appendleft(victim)
        return True

    def _schedule(self) -> _Batch:
        batch = _Batch()
        budget = self.max_batch_tokens
        for sim in list(self._running):
            if sim not in self._running:
                continue  # preempted below to make room for an earlier request
            while not self._grow(sim, sim.context_len):
                # Preempt the newest running request, possibly this one.
                is_self = self._running[-1] is sim
                self._preempt_last()
                if is_self:
                    break
            if sim in self._running and sim.num_blocks >= self._blocks_for(sim.context_len):
                if sim.is_prefilling:
                    chunk = min(budget, sim.context_len - sim.num_computed)
                    if chunk > 0:
                        batch.prefill.append((sim, chunk))
                        budget -= chunk
                else:
                    batch.decode.append(sim)
                    budget -= 1
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            sim = self._waiting[0]
            chunk = min(budget, sim.context_len - sim.num_computed)
            if not self._grow(sim, sim.num_computed + chunk):
                break
            self._waiting.popleft()
            self._running.append(sim)
            batch.prefill.append((sim, chunk))
            budget -= chunk
        return batch

    def _next_token(self, sim: _SimRequest) -> int:
        index = len(sim.output)
        h = hashlib.blake2b(sim.digest + index.to_bytes(4, "little"), digest_size=8).digest()
        return int.from_bytes(h, "little") % self.config.vocab_size

    def _emit(self, sim: _SimRequest) -> RequestProgress:
        token = self._next_token(sim)
        sim.output.append(token)
        reason = None
        if token in sim.request.sampling.stop_token_ids:
            reason = FinishReason.STOP
        elif (
            len(sim.output) >= sim.request.sampling.max_tokens
            or sim.context_len >= self._max_model_len
        ):
            reason = FinishReason.LENGTH
        return RequestProgress(
            sim.request.request_id, (token,), len(sim.output) - 1, sim.context_len, reason
        )

    def step(self) -> StepReport:
        started = time.perf_counter()
        batch = self._schedule()
        progress: list[RequestProgress] = []
        lens = [s.context_len for s in batch.decode]
        prefill_tokens = sum(chunk for _, chunk in batch.prefill)
        pairs = sum(chunk * s.num_computed + chunk * (chunk + 1) // 2 for s, chunk in batch.prefill)
        shape = (len(lens), sum(lens), max(lens, default=0), prefill_tokens, pairs)
        predicted = self.profile.step_time(*shape)
        self.last_step_cost = SimStepCost(*shape, predicted)
        for sim in batch.decode:
            sim.num_computed = sim.context_len
            progress.append(self._emit(sim))
        for sim, chunk in batch.prefill:
            sim.num_computed += chunk
            if not sim.is_prefilling:
                progress.append(self._emit(sim))
        for p in progress:
            if p.finish_reason is not None:
                self._remove(self._requests[p.request_id])
        self._step_index += 1
        if self.config.time_scale > 0:
            time.sleep(
                max(0.0, predicted * self.config.time_scale - (time.perf_counter() - started))
            )
        return StepReport(
            step_index=self._step_index,
            step_time_s=time.perf_counter() - started,
            progress=tuple(progress),
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_blocks_used=self._num_blocks - self._free_blocks,
            kv_blocks_free=self._free_blocks,
        )

    # --- migration -------------------------------------------------------------------------
    def _block_seed(self, tokens: tuple[int, ...], index: int) -> bytes:
        """Digest of the tokens block `index` holds; it starts the block's bytes."""
        return _digest(tokens[index * self.block_size : (index + 1) * self.block_size])

    def _block_bytes(self, tokens: tuple[int, ...], index: int) -> bytes:
        """Block `index`: its seed repeated to the block's size (cheap to make and to check,
        so the transfer, not the simulator, sets the cost of a migration)."""
        seed = self._block_seed(tokens, index)
        size = self._layout.block_bytes
        return (seed * (size // len(seed) + 1))[:size]

    def _running_request(self, request_id: str) -> _SimRequest:
        sim = self._lookup(request_id)
        if sim not in self._running or sim.is_prefilling:
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION, f"request {request_id!r} is not decoding yet"
            )
        return sim

    def copy_full_blocks(self, request_id: str, start_block: int) -> list[bytes]:
        sim = self._running_request(request_id)
        full = (sim.context_len - 1) // self.block_size
        tokens = sim.tokens
        return [self._block_bytes(tokens, b) for b in range(start_block, full)]

    def export_kv(self, request_id: str, skip_blocks: int = 0) -> KVSnapshot:
        sim = self._running_request(request_id)
        cached = sim.context_len - 1
        tokens = sim.tokens
        blocks = [
            self._block_bytes(tokens, b) for b in range(skip_blocks, self._blocks_for(cached))
        ]
        request = EngineRequest(
            sim.request.request_id,
            sim.request.prompt_token_ids,
            sim.request.sampling,
            tuple(sim.output),
        )
        self._remove(sim)
        return KVSnapshot(request, self._layout, cached, blocks)

    def import_kv(self, snapshot: KVSnapshot) -> None:
        problem = self._layout.mismatch(snapshot.layout)
        if problem is not None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"KV layout mismatch: {problem}")
        req = snapshot.request
        self._validate(req)
        if not req.output_token_ids or snapshot.num_cached_tokens != req.context_len - 1:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"snapshot covers {snapshot.num_cached_tokens} tokens; expected {req.context_len - 1}",
            )
        if len(snapshot.blocks) != self._blocks_for(snapshot.num_cached_tokens):
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"snapshot has {len(snapshot.blocks)} blocks; {snapshot.num_cached_tokens} tokens need "
                f"{self._blocks_for(snapshot.num_cached_tokens)}",
            )
        size = self._layout.block_bytes
        tokens = (*req.prompt_token_ids, *req.output_token_ids)
        for index, blob in enumerate(snapshot.blocks):
            # The digest that starts each block identifies its tokens; checking it and the size
            # keeps the import O(blocks) instead of O(bytes).
            seed = self._block_seed(tokens, index)[: min(16, size)]
            if len(blob) != size or blob[: len(seed)] != seed:
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT, f"KV block {index} does not match its tokens"
                )
        sim = _SimRequest(req, list(req.output_token_ids), digest=_digest(req.prompt_token_ids))
        if not self._grow(sim, req.context_len):
            raise EngineError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"needs {self._blocks_for(req.context_len)} KV blocks, {self._free_blocks} free",
            )
        sim.num_computed = snapshot.num_cached_tokens
        self._requests[req.request_id] = sim
        self._running.append(sim)

    def shutdown(self) -> None:
        for sim in list(self._requests.values()):
            self._remove(sim)


def _digest(tokens: tuple[int, ...] | list[int]) -> bytes:
    data = b"".join(t.to_bytes(4, "little") for t in tokens)
    return hashlib.blake2b(data, digest_size=16).digest()
