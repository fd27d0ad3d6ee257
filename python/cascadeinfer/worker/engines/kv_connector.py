"""A vLLM v1 KV connector that moves one request's KV blocks out of and into an engine.

vLLM loads `CascadeKVConnector` by name (`KVTransferConfig(kv_connector="CascadeKVConnector",
kv_connector_module_path=__name__)`) and makes two instances: role SCHEDULER inside the engine
core, role WORKER beside the model runner. They talk through `CascadeConnectorMetadata`, built
once per step, as vLLM intends:

- Export: the engine orders an export, then aborts the request. `request_finished` captures its
  block ids and keeps them allocated (`delay_free=True`); the next step's metadata carries a
  save job; the worker copies the blocks out as opaque bytes (whole blocks, every layer) and
  reports the request in `finished_sending`, and the scheduler frees the blocks.
- Pre-copy: a save job for the full blocks of a request that keeps running (no release).
- Import: a request whose `kv_transfer_params` name a migration reports its cached tokens as
  externally matched (a synchronous load: at least the last token is left to compute); the
  metadata carries the blocks the scheduler allocated; `start_load_kv` writes the bytes into them
  before the forward pass.

The bytes themselves, and the engine's orders, go through a `MigrationHub` that lives in the
engine's process. That needs the scheduler, the worker and the engine in one process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the uniproc executor); both roles check it when vLLM builds
them and fail with a clear error otherwise.

vLLM keeps the worker-side connector in a process-global slot, so several engines in one
process share one WORKER instance (the first engine's). It therefore keeps no per-engine state:
each step's metadata names its hub, and the KV tensors come from the step's forward context.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.forward_context import get_forward_context

from cascadeinfer.worker.engines.kv_blocks import read_blocks, write_blocks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

HUB_ID_KEY = "cascade_hub_id"
"""kv_connector_extra_config key naming the engine's hub."""
MIGRATION_ID_KEY = "cascade_migration_id"
"""kv_transfer_params key: the hub inbox entry holding an imported request's blocks."""
NUM_CACHED_TOKENS_KEY = "cascade_num_cached_tokens"
"""kv_transfer_params key: tokens whose KV the imported blocks hold."""


@dataclass(frozen=True)
class Capture:
    """What `request_finished` saw of an exported request."""

    num_computed_tokens: int
    token_ids: tuple[int, ...]


@dataclass
class MigrationHub:
    """The in-process channel between one engine and its two connector roles.

    The engine thread and vLLM's step run on the same thread in this design (the engine drives
    `LLMEngine.step()` itself), so plain containers suffice.
    """

    hub_id: str
    export_orders: dict[str, int] = field(default_factory=dict)
    """Engine -> scheduler side: internal request id -> blocks to leave out."""
    copy_orders: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Engine -> scheduler side: internal request id -> [start, end) block range to copy."""
    captured: dict[str, Capture] = field(default_factory=dict)
    """Scheduler side -> engine: exported requests as they stood when stopped."""
    inbox: dict[str, list[bytes]] = field(default_factory=dict)
    """Engine -> worker: migration id -> the snapshot's blocks (all of them, in order)."""
    outbox: dict[str, list[bytes]] = field(default_factory=dict)
    """Worker -> engine: internal request id -> copied blocks."""
    finished_sending: set[str] = field(default_factory=set)
    """Worker, between its calls in one step: exports copied, blocks ready to free."""


_HUBS: dict[str, MigrationHub] = {}
_HUBS_LOCK = threading.Lock()


def open_hub(hub_id: str) -> MigrationHub:
    """Registers a hub before its engine is built (the connector looks it up at start-up)."""
    with _HUBS_LOCK:
        if hub_id in _HUBS:
            raise ValueError(f"hub {hub_id!r} is already open")
        hub = MigrationHub(hub_id)
        _HUBS[hub_id] = hub
        return hub


def close_hub(hub_id: str) -> None:
    with _HUBS_LOCK:
        _HUBS.pop(hub_id, None)


def num_open_hubs() -> int:
    with _HUBS_LOCK:
        return len(_HUBS)


def get_hub(hub_id: str) -> MigrationHub:
    with _HUBS_LOCK:
        hub = _HUBS.get(hub_id)
    if hub is None:
        raise RuntimeError(
            f"CascadeKVConnector: no migration hub {hub_id!r} in this process. The connector "
            "hands KV bytes to the engine in-process: build the engine with "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 and the uniproc executor (VllmEngine does)."
        )
    return hub


@dataclass(frozen=True)
class BlockLoad:
    """Write a snapshot's blocks [first_block, first_block + len(block_ids)) into block_ids."""

    migration_id: str
    block_ids: tuple[int, ...]
    first_block: int


@dataclass(frozen=True)
class BlockSave:
    """Copy block_ids out into the hub's outbox under `key`; release them when `releases`."""

    key: str
    block_ids: tuple[int, ...]
    releases: bool


@dataclass
class CascadeConnectorMetadata(KVConnectorMetadata):
    """Scheduler side -> worker side, one per step."""

    hub_id: str
    num_blocks: int
    """Blocks in the scheduler's pool; a KV tensor may split each into several kernel blocks."""
    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)
    discards: list[str] = field(default_factory=list)
    """Migration ids whose bytes will not be loaded (aborted, or cached locally already)."""


def migration_params(request: Request) -> tuple[str, int] | None:
    """(migration id, cached tokens) for an imported request, else None."""
    params = request.kv_transfer_params
    if not params or MIGRATION_ID_KEY not in params:
        return None
    return str(params[MIGRATION_ID_KEY]), int(params[NUM_CACHED_TOKENS_KEY])


class CascadeKVConnector(KVConnectorBase_V1):
    """Export, pre-copy and import of whole KV blocks for migration between engines."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _require_single_process(vllm_config)
        hub_id = self._kv_transfer_config.get_from_extra_config(HUB_ID_KEY, None)
        if hub_id is None:
            raise ValueError(f"kv_connector_extra_config needs {HUB_ID_KEY!r}")
        self._hub = get_hub(str(hub_id))
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        self._started: set[str] = set()
        """Migration ids whose load was planned (or dropped): matched at most once."""
        self._loads: list[BlockLoad] = []
        self._saves: list[BlockSave] = []
        self._discards: list[str] = []
        self._load_errors: set[int] = set()

    # ---- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        migration = migration_params(request)
        if migration is None or migration[0] in self._started:
            return 0, False
        # A sync load must leave one token to compute; the snapshot never covers the last one.
        num_cached = min(migration[1], request.num_tokens - 1)
        return max(num_cached - num_computed_tokens, 0), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        migration = migration_params(request)
        if migration is None or migration[0] in self._started:
            return
        migration_id, num_cached = migration
        self._started.add(migration_id)
        if num_external_tokens == 0:
            self._discards.append(migration_id)
            return
        # Tokens before the external ones hit the local prefix cache; that hit is block-aligned.
        first = (num_cached - num_external_tokens) // self._block_size
        end = math.ceil(num_cached / self._block_size)
        block_ids = blocks.get_block_ids()[0]
        self._loads.append(BlockLoad(migration_id, tuple(block_ids[first:end]), first))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        migration = migration_params(request)
        if migration is not None and migration[0] not in self._started:
            self._discards.append(migration[0])  # never loaded: drop its bytes
        elif migration is not None:
            self._started.discard(migration[0])
        skip_blocks = self._hub.export_orders.pop(request.request_id, None)
        if skip_blocks is None:
            return False, None
        self._hub.captured[request.request_id] = Capture(
            num_computed_tokens=request.num_computed_tokens,
            token_ids=tuple(request.all_token_ids),
        )
        self._saves.append(BlockSave(request.request_id, tuple(block_ids[skip_blocks:]), True))
        return True, None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        for request_id, (start, end) in self._hub.copy_orders.items():
            self._saves.append(BlockSave(request_id, self._block_ids(request_id)[start:end], False))
        self._hub.copy_orders.clear()
        meta = CascadeConnectorMetadata(
            hub_id=self._hub.hub_id,
            num_blocks=self._num_blocks,
            loads=self._loads,
            saves=self._saves,
            discards=self._discards,
        )
        self._loads, self._saves, self._discards = [], [], []
        return meta

    def has_pending_push_work(self) -> bool:
        """Ordered copies keep the engine stepping even while its scheduler is paused."""
        return bool(self._hub.copy_orders or self._saves or self._loads or self._discards)

    def _block_ids(self, request_id: str) -> tuple[int, ...]:
        manager = self._kv_cache_manager
        if manager is None:
            raise RuntimeError("CascadeKVConnector: the scheduler bound no KV cache manager")
        try:
            return tuple(manager.get_block_ids(request_id)[0])
        except KeyError:
            return ()

    # ---- worker side ----------------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._metadata()
        hub = get_hub(meta.hub_id)
        for migration_id in meta.discards:
            hub.inbox.pop(migration_id, None)
        if not meta.loads:
            return
        caches = layer_caches(forward_context)
        for load in meta.loads:
            blobs = hub.inbox.pop(load.migration_id, None)
            wanted = None if blobs is None else blobs[load.first_block :][: len(load.block_ids)]
            if wanted is None or len(wanted) != len(load.block_ids):
                # vLLM recomputes the tokens of blocks reported as failed.
                self._load_errors.update(load.block_ids)
                continue
            write_blocks(caches, meta.num_blocks, load.block_ids, wanted)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self) -> None:
        """Runs the step's copies out; the exported blocks are still held, so this is safe
        after the forward pass too."""
        meta = self._metadata()
        if not meta.saves:
            return
        hub = get_hub(meta.hub_id)
        caches = layer_caches(get_forward_context())
        for save in meta.saves:
            hub.outbox[save.key] = read_blocks(caches, meta.num_blocks, save.block_ids)
            if save.releases:
                hub.finished_sending.add(save.key)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not self.has_connector_metadata():
            return None, None
        hub = get_hub(self._metadata().hub_id)
        done, hub.finished_sending = hub.finished_sending, set()
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _metadata(self) -> CascadeConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CascadeConnectorMetadata):
            raise TypeError(f"unexpected connector metadata {type(meta).__name__}")
        return meta


def _require_single_process(vllm_config: VllmConfig) -> None:
    parallel = vllm_config.parallel_config
    if parallel.world_size != 1 or parallel.distributed_executor_backend not in (None, "uni"):
        raise RuntimeError(
            "CascadeKVConnector needs one worker in the engine's process (uniproc executor, "
            f"world size 1); got backend {parallel.distributed_executor_backend!r}, "
            f"world size {parallel.world_size}"
        )


def layer_caches(forward_context: ForwardContext) -> list[torch.Tensor]:
    """The KV tensors of the engine running this step (not of the engine that built us)."""
    return layer_caches_of(forward_context.no_compile_layers)


def layer_caches_of(layers: dict[str, Any]) -> list[torch.Tensor]:
    """Per-layer KV tensors in layer-name order (layers sharing one counted once)."""
    caches: list[torch.Tensor] = []
    seen: set[int] = set()
    for name in sorted(layers):
        kv = getattr(layers[name], "kv_cache", None)
        if isinstance(kv, torch.Tensor) and kv.numel() > 0 and kv.data_ptr() not in seen:
            seen.add(kv.data_ptr())
            caches.append(kv)
    return caches
