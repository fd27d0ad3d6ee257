"""A vLLM KV connector that moves one request's KV blocks across vLLM's process boundaries.

For `VllmMpEngine` (AsyncLLM): the daemon, the engine core (scheduler-role connector) and one
worker process per tensor-parallel rank (worker-role connector) are separate processes, so every
exchange goes over ZeroMQ side channels, each message carrying the engine's shared secret
(random per engine, handed to vLLM in `kv_connector_extra_config`; the sockets are ipc files in
a directory only the daemon's user can enter):

- control (daemon -> scheduler role, REQ/REP): "copy the full blocks of request TAG from block
  N on" (a pre-copy: the request keeps decoding; full blocks never change again, so only the
  blocks filled meanwhile and the partial last one move while it is stopped), and "stop
  request TAG for export, leaving out its first N blocks". Requests carry
  their daemon-side id as a tag in `kv_transfer_params` (vLLM adds a random suffix to its own
  ids). The order is applied in `build_connector_meta`, on the engine core's thread, by capping
  the request's `max_tokens` at its next token: vLLM ends it with finish reason "length" and
  `request_finished` keeps its blocks (`delay_free`) and returns the cached-token count, which
  reaches the daemon in the final `RequestOutput.kv_transfer_params`. Capping `max_tokens` is
  outside the connector API: pinned to vLLM 0.32 and covered by the exactness tests.
- export (each worker rank -> daemon, PUSH/PULL): the rank copies the blocks out as opaque bytes
  (its shard of the KV heads), sends them with the tag and its rank, and reports the request in
  `finished_sending`; vLLM frees the blocks once every rank has.
- import (daemon -> each worker rank, PUSH/PULL): the daemon sends each rank its shard of a
  snapshot under a migration id, then adds the request with that id in `kv_transfer_params`;
  the scheduler role reports the cached tokens as externally matched and loaded
  asynchronously, so vLLM allocates the blocks and parks the request (WAITING_FOR_REMOTE_KVS)
  while the batch goes on. Each rank's loader thread writes the bytes into the allocated blocks
  as soon as both they and the load order are there (`shard_inbox.py`) and reports the request
  in `finished_recving`; vLLM then schedules it from the loaded tokens on. Bytes that do not
  arrive within LOAD_WAIT_S are reported in `failed_recving`, and `kv_load_failure_policy =
  "recompute"` recomputes the request's context instead.

Known limit: the bytes pass through both daemons (gRPC in between), not rank to rank between
hosts.
"""

from __future__ import annotations

import hmac
import json
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from cascadeinfer.worker.engines.kv_blocks import read_block_rows, write_blocks
from cascadeinfer.worker.engines.kv_connector import layer_caches_of
from cascadeinfer.worker.engines.parent_watch import watch_parent
from cascadeinfer.worker.engines.shard_inbox import Shard, ShardInbox

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

TAG_KEY = "cascade_tag"
"""kv_transfer_params: the daemon's id for the request."""
MIGRATION_ID_KEY = "cascade_migration_id"
"""kv_transfer_params: the snapshot the ranks were sent for an imported request."""
NUM_CACHED_TOKENS_KEY = "cascade_num_cached_tokens"
"""kv_transfer_params: tokens whose KV a snapshot (or an export) holds."""
SECRET_KEY = "cascade_secret"
CONTROL_KEY = "cascade_control"
EXPORT_KEY = "cascade_export"
IMPORT_PREFIX_KEY = "cascade_import_prefix"
"""kv_connector_extra_config keys: the shared secret and the side channels' addresses (the
import address gets `.RANK` appended)."""
LOAD_WAIT_S = 10.0
"""How long a load waits for its bytes before it is reported failed (and recomputed). The
daemon sends them before it adds the request, so they are normally there already; the wait
stalls nothing but the request itself."""
INBOX_TTL_S = 60.0
INBOX_MAX_SNAPSHOTS = 64
"""Bounds on the imported bytes a rank holds for loads not ordered (yet)."""


def import_address(prefix: str, rank: int) -> str:
    return f"{prefix}.{rank}"


def is_authentic(secret: bytes, frame: bytes) -> bool:
    return hmac.compare_digest(secret, frame)


@dataclass(frozen=True)
class Load:
    request_id: str
    """vLLM's id, what `finished_recving` reports."""
    migration_id: str
    block_ids: tuple[int, ...]
    first_block: int


@dataclass(frozen=True)
class Save:
    request_id: str
    tag: str
    """What the shards are sent under: the request's tag, or COPY_SUFFIX added for a pre-copy."""
    block_ids: tuple[int, ...]
    releases: bool
    """An export: report the request in finished_sending so vLLM frees its blocks."""


COPY_SUFFIX = "#copy"
"""Pre-copied shards are sent under the request's tag plus this."""


@dataclass
class MpConnectorMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    discards: list[str] = field(default_factory=list)
    """Migration ids whose bytes no load will read (their tokens were cached locally)."""


class CascadeMpConnector(KVConnectorBase_V1):
    """Export on a stop order and import by migration id, across processes (see module)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._secret = str(extra[SECRET_KEY]).encode()
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        self._context = zmq.Context()
        watch_parent()  # the engine core and the ranks end with the daemon that started them
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self, str(extra[CONTROL_KEY]))
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = _WorkerSide(
                self,
                get_tensor_model_parallel_rank(),
                str(extra[EXPORT_KEY]),
                str(extra[IMPORT_PREFIX_KEY]),
            )

    # ---- scheduler side (engine-core process) ---------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.matched(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler.allocated(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_meta()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self._scheduler.has_work()

    # ---- worker side (one process per rank) -----------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.caches = layer_caches_of(
            {name: _Holder(tensor) for name, tensor in kv_caches.items()}
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.load(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kw: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        self._worker.save(self._metadata())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self._worker.take_results()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self._worker.take_results()
        return (results.finished_sending or None), (results.finished_recving or None)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # A snapshot holds the request's own blocks of every group, not hash-addressed
        # prefixes: vLLM must not zero any of them behind the loader's back.
        return tuple(self._kv_cache_config.transfer_group_ids)

    def _metadata(self) -> MpConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, MpConnectorMetadata):
            raise TypeError(f"unexpected connector metadata {type(meta).__name__}")
        return meta


@dataclass
class _Holder:
    """Lets `layer_caches_of` read registered tensors as it reads attention layers."""

    kv_cache: torch.Tensor


class _SchedulerSide:
    """Runs in the engine core. A thread answers control orders; the engine core's thread
    applies them in `build_meta`."""

    def __init__(self, connector: CascadeMpConnector, control_address: str) -> None:
        self._c = connector
        self._orders: queue.Queue[dict[str, Any]] = queue.Queue()
        self._running: dict[str, Request] = {}
        """Tag -> the live request, seen when vLLM first asked about it."""
        self._exporting: dict[str, int] = {}
        """Tag -> blocks already pre-copied (left out of the export)."""
        self._started: set[str] = set()
        self._loads: list[Load] = []
        self._saves: list[Save] = []
        self._discards: list[str] = []
        socket = connector._context.socket(zmq.REP)
        socket.bind(control_address)
        threading.Thread(target=self._serve, args=(socket,), daemon=True).start()

    def _serve(self, socket: zmq.Socket[bytes]) -> None:
        while True:
            frames = socket.recv_multipart()
            if len(frames) != 2 or not is_authentic(self._c._secret, frames[0]):
                socket.send(b"refused")
                continue
            self._orders.put(json.loads(frames[1]))
            socket.send(b"queued")

    def matched(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        tag = params.get(TAG_KEY)
        if tag is not None:
            self._running.setdefault(str(tag), request)
        migration_id = params.get(MIGRATION_ID_KEY)
        if migration_id is None or migration_id in self._started:
            return 0, False
        num_cached = _snapshot_tokens(request, params)
        num_external = max(num_cached - num_computed_tokens, 0)
        return num_external, num_external > 0

    def allocated(self, request: Request, block_ids: list[int], num_external: int) -> None:
        params = request.kv_transfer_params or {}
        migration_id = params.get(MIGRATION_ID_KEY)
        if migration_id is None or migration_id in self._started:
            return
        self._started.add(str(migration_id))
        if num_external == 0:
            self._discards.append(str(migration_id))  # all cached locally
            return
        num_cached = _snapshot_tokens(request, params)
        first = (num_cached - num_external) // self._c._block_size
        end = math.ceil(num_cached / self._c._block_size)
        load = Load(request.request_id, str(migration_id), tuple(block_ids[first:end]), first)
        self._loads.append(load)

    def build_meta(self) -> MpConnectorMetadata:
        while True:
            try:
                order = self._orders.get_nowait()
            except queue.Empty:
                break
            tag, first = str(order["tag"]), int(order["first_block"])
            request = self._running.get(tag)
            is_live = request is not None and not request.is_finished()
            if order["op"] == "copy":
                blocks = self._full_blocks(request)[first:] if is_live else ()
                self._saves.append(Save("", tag + COPY_SUFFIX, tuple(blocks), releases=False))
            elif is_live and request is not None:
                self._exporting[tag] = first
                # Ends the request with "length" after the token this step computes.
                request.max_tokens = min(request.max_tokens, request.num_output_tokens + 1)
        meta = MpConnectorMetadata(loads=self._loads, saves=self._saves, discards=self._discards)
        self._loads, self._saves, self._discards = [], [], []
        return meta

    def finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params or {}
        tag = str(params.get(TAG_KEY))
        self._running.pop(tag, None)
        migration_id = params.get(MIGRATION_ID_KEY)
        if migration_id is not None:
            self._started.discard(str(migration_id))
        first = self._exporting.pop(tag, None)
        if first is None:
            return False, None
        num_cached = request.num_computed_tokens
        blocks = tuple(block_ids[first : math.ceil(num_cached / self._c._block_size)])
        self._saves.append(Save(request.request_id, tag, blocks, releases=True))
        return True, {TAG_KEY: tag, NUM_CACHED_TOKENS_KEY: num_cached}

    def _full_blocks(self, request: Request | None) -> list[int]:
        manager = self._c._kv_cache_manager
        if request is None or manager is None:
            return []
        num_full = request.num_computed_tokens // self._c._block_size
        return list(manager.get_block_ids(request.request_id)[0][:num_full])

    def has_work(self) -> bool:
        return bool(self._saves or self._loads or self._discards or not self._orders.empty())


def _snapshot_tokens(request: Request, params: dict[str, Any]) -> int:
    """Tokens an imported snapshot restores: never the last one, which is computed again to
    sample the next."""
    return min(int(params[NUM_CACHED_TOKENS_KEY]), request.num_tokens - 1)


class _WorkerSide:
    """Runs in each worker process: sends exported shards; a receiver thread takes imported
    ones into the inbox and a loader thread writes them into their blocks (see module)."""

    def __init__(
        self, connector: CascadeMpConnector, rank: int, export_address: str, import_prefix: str
    ) -> None:
        self._c = connector
        self._rank = rank
        self.caches: list[torch.Tensor] = []
        self._sent: set[str] = set()
        self._results = threading.Lock()
        self._received: set[str] = set()
        self._failed: set[str] = set()
        self._out = connector._context.socket(zmq.PUSH)
        self._out.connect(export_address)
        self._inbox: ShardInbox[Load] = ShardInbox(
            wait_s=LOAD_WAIT_S, ttl_s=INBOX_TTL_S, max_entries=INBOX_MAX_SNAPSHOTS
        )
        inbound = connector._context.socket(zmq.PULL)
        inbound.bind(import_address(import_prefix, rank))
        threading.Thread(target=self._receive, args=(inbound,), daemon=True).start()
        threading.Thread(target=self._load_forever, daemon=True).start()

    def _receive(self, socket: zmq.Socket[bytes]) -> None:
        while True:
            frames = socket.recv_multipart(copy=False)
            if len(frames) < 2 or not is_authentic(self._c._secret, frames[0].bytes):
                continue
            header = json.loads(frames[1].bytes)
            # Views of ZeroMQ's own buffers: the shards are copied once, into the blocks.
            shards: list[Shard] = [frame.buffer for frame in frames[2:]]
            self._inbox.put(str(header["migration_id"]), shards)

    def load(self, meta: MpConnectorMetadata) -> None:
        """Hands the step's load orders to the loader thread; returns at once."""
        for migration_id in meta.discards:
            self._inbox.discard(migration_id)
        for load in meta.loads:
            self._inbox.expect(load.migration_id, load)

    def _load_forever(self) -> None:
        # The blocks written here belong to requests vLLM parks until they are reported
        # received: no forward pass reads or writes them meanwhile.
        while True:
            due = self._inbox.next_due(timeout_s=1.0)  # the timeout lets stale bytes expire
            for load, shards in due.ready:
                wanted = shards[load.first_block :][: len(load.block_ids)]
                is_written = len(wanted) == len(load.block_ids)
                if is_written:
                    try:
                        write_blocks(self.caches, self._c._num_blocks, load.block_ids, wanted)
                    except (RuntimeError, ValueError):
                        is_written = False  # bytes of the wrong size: recomputed instead
                self._settle(load, is_written)
            for load in due.expired:
                self._settle(load, False)

    def _settle(self, load: Load, is_written: bool) -> None:
        with self._results:
            self._received.add(load.request_id)
            if not is_written:
                self._failed.add(load.request_id)  # recomputed (kv_load_failure_policy)

    def take_results(self) -> KVConnectorTransferResults:
        """Exports sent and loads settled since the last step (a failed load is reported
        received too: vLLM releases it from its wait and recomputes it)."""
        sent, self._sent = self._sent, set()
        with self._results:
            received, self._received = self._received, set()
            failed, self._failed = self._failed, set()
        return KVConnectorTransferResults(
            finished_sending=sent, finished_recving=received, failed_recving=failed
        )

    def save(self, meta: MpConnectorMetadata) -> None:
        for save in meta.saves:
            blobs = read_block_rows(self.caches, self._c._num_blocks, save.block_ids)
            header = json.dumps({"tag": save.tag, "rank": self._rank}).encode()
            self._out.send_multipart([self._c._secret, header, *blobs], copy=False)
            if save.releases:
                self._sent.add(save.request_id)
