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
  the scheduler role reports the cached tokens as externally matched, and the rank writes the
  bytes into the allocated blocks before the forward pass. Bytes that do not arrive in time are
  reported as failed blocks, and `kv_load_failure_policy = "recompute"` recomputes them.

Known limits: the load is synchronous, and the bytes pass through both daemons (gRPC in
between), not rank to rank between hosts.
"""

from __future__ import annotations

import hmac
import json
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from cascadeinfer.worker.engines.kv_connector import layer_caches_of, read_blocks, write_blocks
from cascadeinfer.worker.engines.parent_watch import watch_parent

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
LOAD_WAIT_S = 2.0
"""How long a rank waits for an import's bytes before reporting its blocks as failed (the
daemon sends them before it adds the request, so they are normally there already; the wait
stalls the rank's step, hence short)."""


def import_address(prefix: str, rank: int) -> str:
    return f"{prefix}.{rank}"


def is_authentic(secret: bytes, frame: bytes) -> bool:
    return hmac.compare_digest(secret, frame)


@dataclass(frozen=True)
class Load:
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

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._worker.sent = self._worker.sent, set()
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._worker.load_errors = self._worker.load_errors, set()
        return errors

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
        # A sync load must leave one token to compute; a snapshot never covers the last one.
        num_cached = min(int(params[NUM_CACHED_TOKENS_KEY]), request.num_tokens - 1)
        return max(num_cached - num_computed_tokens, 0), False

    def allocated(self, request: Request, block_ids: list[int], num_external: int) -> None:
        params = request.kv_transfer_params or {}
        migration_id = params.get(MIGRATION_ID_KEY)
        if migration_id is None or migration_id in self._started:
            return
        self._started.add(str(migration_id))
        if num_external == 0:
            return  # all cached locally; the ranks drop the bytes after LOAD_WAIT_S unread
        num_cached = int(params[NUM_CACHED_TOKENS_KEY])
        first = (num_cached - num_external) // self._c._block_size
        end = math.ceil(num_cached / self._c._block_size)
        self._loads.append(Load(str(migration_id), tuple(block_ids[first:end]), first))

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
        meta = MpConnectorMetadata(loads=self._loads, saves=self._saves)
        self._loads, self._saves = [], []
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
        return bool(self._saves or self._loads or not self._orders.empty())


class _WorkerSide:
    """Runs in each worker process: sends exported shards, receives and writes imported ones."""

    def __init__(
        self, connector: CascadeMpConnector, rank: int, export_address: str, import_prefix: str
    ) -> None:
        self._c = connector
        self._rank = rank
        self.caches: list[torch.Tensor] = []
        self.sent: set[str] = set()
        self.load_errors: set[int] = set()
        self._out = connector._context.socket(zmq.PUSH)
        self._out.connect(export_address)
        self._inbox: dict[str, list[bytes]] = {}
        self._arrived = threading.Condition()
        inbound = connector._context.socket(zmq.PULL)
        inbound.bind(import_address(import_prefix, rank))
        threading.Thread(target=self._receive, args=(inbound,), daemon=True).start()

    def _receive(self, socket: zmq.Socket[bytes]) -> None:
        while True:
            frames = socket.recv_multipart()
            if len(frames) < 2 or not is_authentic(self._c._secret, frames[0]):
                continue
            header = json.loads(frames[1])
            with self._arrived:
                self._inbox[str(header["migration_id"])] = list(frames[2:])
                self._arrived.notify_all()

    def load(self, meta: MpConnectorMetadata) -> None:
        for load in meta.loads:
            blobs = self._wait_for(load.migration_id)
            wanted = None if blobs is None else blobs[load.first_block :][: len(load.block_ids)]
            if wanted is None or len(wanted) != len(load.block_ids):
                self.load_errors.update(load.block_ids)  # recomputed (kv_load_failure_policy)
                continue
            write_blocks(self.caches, self._c._num_blocks, load.block_ids, wanted)

    def _wait_for(self, migration_id: str) -> list[bytes] | None:
        deadline = time.monotonic() + LOAD_WAIT_S
        with self._arrived:
            while migration_id not in self._inbox and time.monotonic() < deadline:
                self._arrived.wait(deadline - time.monotonic())
            return self._inbox.pop(migration_id, None)

    def save(self, meta: MpConnectorMetadata) -> None:
        for save in meta.saves:
            blobs = read_blocks(self.caches, self._c._num_blocks, save.block_ids)
            header = json.dumps({"tag": save.tag, "rank": self._rank}).encode()
            self._out.send_multipart([self._c._secret, header, *blobs])
            if save.releases:
                self.sent.add(save.request_id)
