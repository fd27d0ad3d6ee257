"""The engine interface the worker daemon drives, and the domain types that cross it.

Two implementations: `engines/vllm_engine.py` (a real vLLM v1 engine in-process) and
`engines/sim_engine.py` (a simulator for load tests). The daemon calls every method from one
engine thread, between steps, so implementations need no locking of their own.

Migration is stop-and-copy with an optional pre-copy: `copy_full_blocks` may be called while the
request keeps decoding (full KV blocks never change again), then `export_kv` stops the request
and returns the remaining blocks. A target resumes it with `import_kv`. If anything fails after
`export_kv`, the source calls `import_kv` with its own snapshot, so the request keeps running
where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

# The types the scheduler shares with the engine live in cascadeinfer.domain; re-exported here
# for the engines, which take them from their interface module.
from cascadeinfer.domain import EngineError as EngineError
from cascadeinfer.domain import ErrorCode as ErrorCode
from cascadeinfer.domain import FinishReason as FinishReason
from cascadeinfer.domain import SamplingSpec as SamplingSpec


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    output_token_ids: tuple[int, ...] = ()
    """For a resumed request: the output it already produced elsewhere. `sampling.max_tokens`
    still counts from the original start, so the remaining budget is max_tokens - len(this)."""

    @property
    def context_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def remaining_tokens(self) -> int:
        return self.sampling.max_tokens - len(self.output_token_ids)


@dataclass(frozen=True)
class RequestProgress:
    """One request after one engine step."""

    request_id: str
    new_token_ids: tuple[int, ...]
    first_index: int
    """Output index of new_token_ids[0] (counted from the request's original start)."""
    context_len: int
    """Prompt plus every output token so far."""
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class StepReport:
    """What one engine step did; the worker turns it into one feed message."""

    step_index: int
    step_time_s: float
    progress: tuple[RequestProgress, ...]
    """Every request that ran this step or finished in it."""
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prompt_tokens: int = 0
    """Prompt tokens of the requests that started here and produced their first token in this
    step (imported and resumed requests are not counted: their KV came with them)..."""
    prompt_tokens_cached: int = 0
    """... and of those, the ones the engine's prefix cache served instead of a prefill."""


@dataclass(frozen=True)
class KVLayout:
    """What must match for KV blocks to be meaningful on another engine."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    backend: str
    block_bytes: int
    """Bytes of one block across all layers (K and V)."""

    def mismatch(self, other: KVLayout) -> str | None:
        """The first differing field as 'name: ours vs theirs', or None when compatible."""
        for f in fields(self):
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours != theirs:
                return f"{f.name}: {ours!r} here vs {theirs!r} in the snapshot"
        return None


@dataclass
class KVSnapshot:
    """A stopped request and its KV cache, on its way to another engine."""

    request: EngineRequest
    """Prompt, original sampling, and every output token so far."""
    layout: KVLayout
    num_cached_tokens: int
    """Tokens whose KV the blocks hold (the last sampled token has none yet)."""
    blocks: list[bytes] = field(default_factory=list)
    """One opaque blob per block, in order; len == ceil(num_cached_tokens / block_size).
    Empty when the blocks went rank to rank (`transfer_id`)."""
    transfer_id: str | None = None
    """The blocks were sent straight to the importing engine's ranks under this id
    (`RankToRankKV`); only that engine can resume the snapshot with its cached tokens."""


@dataclass(frozen=True)
class KVPeer:
    """Where an engine's tensor-parallel ranks take KV shards straight from a peer's ranks of
    the same number: `endpoints[r]` is rank r's, encrypted to `server_key` (CURVE, Z85; empty:
    not encrypted), and every part must carry `ticket`."""

    endpoints: tuple[str, ...]
    server_key: bytes
    ticket: bytes


@dataclass(frozen=True)
class KVTransfer:
    """One migration's rank-to-rank road: the target's ranks, and the id the parts go under."""

    peer: KVPeer
    transfer_id: str


class Engine(Protocol):
    """An inference engine one worker hosts. Every method runs on the worker's engine thread."""

    @property
    def name(self) -> str:
        """'vllm' or 'sim'."""
        ...

    @property
    def layout(self) -> KVLayout: ...

    @property
    def can_move_kv(self) -> bool:
        """False where KV blocks cannot leave the engine (vLLM with its engine core in another
        process): migrations from it go in recompute mode."""
        ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: [0, vocab_size)."""
        ...

    @property
    def num_blocks_total(self) -> int: ...

    def num_free_blocks(self) -> int: ...

    def add_request(self, request: EngineRequest) -> None:
        """Queues a request (new, or resumed with output_token_ids for recompute).
        Raises INVALID_ARGUMENT, ALREADY_EXISTS or RESOURCE_EXHAUSTED."""
        ...

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its blocks. Raises NOT_FOUND."""
        ...

    def has_unfinished(self) -> bool: ...

    def check_health(self) -> None:
        """Raises once the engine can serve no more (a process it runs in died); called
        between steps, also while idle."""
        ...

    def step(self) -> StepReport:
        """Runs one engine step."""
        ...

    def copy_full_blocks(self, request_id: str, start_block: int) -> list[bytes]:
        """Copies the running request's full blocks from start_block on, without stopping it."""
        ...

    def export_kv(self, request_id: str, skip_blocks: int = 0) -> KVSnapshot:
        """Stops a running request and returns it with its KV blocks (the first skip_blocks
        left out: the caller copied them already). Its blocks are free afterwards.
        Raises NOT_FOUND, or FAILED_PRECONDITION when it is not running (still waiting)."""
        ...

    def import_kv(self, snapshot: KVSnapshot) -> None:
        """Resumes a request from a complete snapshot; it decodes on from its last token.
        Raises FAILED_PRECONDITION on a layout mismatch, RESOURCE_EXHAUSTED without room,
        ALREADY_EXISTS, INVALID_ARGUMENT for a malformed snapshot."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class RankToRankKV(Protocol):
    """What an engine whose ranks send KV shards straight to a peer's ranks offers besides
    `Engine` (vLLM with its engine core in its own process): the bytes never pass through the
    daemons. Migration takes this road when both engines have it."""

    @property
    def kv_peer(self) -> KVPeer | None:
        """This engine's side channel for peers; None where it has none."""
        ...

    def send_full_blocks(self, request_id: str, start_block: int, transfer: KVTransfer) -> int:
        """`Engine.copy_full_blocks`, sent to the peer's ranks; returns the blocks delivered.
        Raises RuntimeError when a rank could not deliver them."""
        ...

    def export_kv_to(self, request_id: str, skip_blocks: int, transfer: KVTransfer) -> KVSnapshot:
        """`Engine.export_kv`, the blocks sent to the peer's ranks: the snapshot has no blocks
        and its `transfer_id` set, or, where the ranks could not deliver them, no cached
        tokens (a recompute resume)."""
        ...


def kv_peer_of(engine: Engine) -> KVPeer | None:
    """The engine's rank-to-rank side channel; None where it has none."""
    return engine.kv_peer if isinstance(engine, RankToRankKV) else None
