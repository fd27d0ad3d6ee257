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

- peer (a peer's rank -> this rank of the same number, ROUTER/DEALER over TCP): the rank-to-rank
  road between workers. Each rank binds a TCP port on the host the operator configures, with
  ZeroMQ's CURVE encryption under the engine's key pair, and tells the daemon its endpoint
  (a "hello" on the export channel); the daemon publishes the endpoints, the public key and a
  random ticket in GetInfo. A copy or stop order that names a transfer (a peer's endpoints, key
  and ticket, and an id) makes each rank send its shard straight to the peer's rank, which
  checks the ticket, holds the part in its inbox under the transfer id and answers; the rank
  then tells its daemon the part was delivered (or why not), without the bytes. The daemon
  never holds them, and the peer's daemon adds the request with the transfer id as its
  migration id. Messages are capped at what this engine's whole cache holds.
"""

from __future__ import annotations

import hmac
import json
import math
import queue
import threading
from collections import OrderedDict
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

from cascadeinfer.memory import TRIM_AFTER_BYTES, release_freed_memory
from cascadeinfer.worker.engine import KVPeer, KVTransfer
from cascadeinfer.worker.engines.kv_blocks import read_block_rows, write_blocks
from cascadeinfer.worker.engines.kv_connector import layer_caches_of
from cascadeinfer.worker.engines.parent_watch import watch_parent
from cascadeinfer.worker.engines.shard_inbox import Due, Shard, ShardInbox

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
PEER_HOST_KEY = "cascade_peer_host"
PEER_ADVERTISE_KEY = "cascade_peer_advertise"
PEER_PORT_KEY = "cascade_peer_port"
PEER_SECRET_KEY_KEY = "cascade_peer_secret_key"
"""(Absent: the channel is not encrypted, only ticket-checked.)"""
PEER_TICKET_KEY = "cascade_peer_ticket"
"""kv_connector_extra_config keys of the rank-to-rank side channel: the address each rank
binds (port + rank; port 0: one the system picks) and the host peers connect to, the ranks'
CURVE secret key (Z85) and the ticket peers must show. Absent: no rank-to-rank channel."""
MAX_PEER_SOCKETS = 64
"""Sockets a rank keeps open to peers' ranks (least recently used closed beyond)."""
PEER_ACK_TIMEOUT_S = 20.0
"""How long a rank waits for a peer's rank to confirm a part, beyond the part's bytes at
MIN_TRANSFER_BYTES_PER_S, before reporting it undelivered (the daemon's own wait is longer)."""
MIN_TRANSFER_BYTES_PER_S = 32 << 20
"""The slowest rate a wait for KV bytes allows for: a 32K-token request of an 8B model (4.3 GB)
took longer than a fixed 30 s over an encrypted channel on 2 CPU cores, and the move fell back
to recompute. Encrypted rank to rank moved 90-212 MiB/s there (docs/benchmarks.md)."""


def transfer_wait_s(base_s: float, num_bytes: int) -> float:
    """A wait for `num_bytes` to move: `base_s` plus their time at MIN_TRANSFER_BYTES_PER_S."""
    return base_s + num_bytes / MIN_TRANSFER_BYTES_PER_S


LOAD_WAIT_S = 10.0
"""How long a load waits for its bytes before it is reported failed (and recomputed). The
daemon sends them before it adds the request, so they are normally there already; the wait
stalls nothing but the request itself."""
INBOX_TTL_S = 60.0
"""Imported bytes no load claimed are dropped this long after their snapshot's last part."""
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


def transfer_to_order(transfer: KVTransfer) -> dict[str, Any]:
    """A transfer as a control order carries it (JSON), to the engine core and the ranks."""
    peer = transfer.peer
    return {
        "endpoints": list(peer.endpoints),
        "server_key": peer.server_key.decode(),
        "ticket": peer.ticket.decode(),
        "transfer_id": transfer.transfer_id,
    }


def transfer_from_order(order: dict[str, Any]) -> KVTransfer | None:
    t = order.get("transfer")
    if t is None:
        return None
    peer = KVPeer(
        tuple(str(e) for e in t["endpoints"]),
        str(t["server_key"]).encode(),
        str(t["ticket"]).encode(),
    )
    return KVTransfer(peer, str(t["transfer_id"]))


@dataclass(frozen=True)
class Save:
    request_id: str
    block_ids: tuple[int, ...]
    releases: bool
    """An export: report the request in finished_sending so vLLM frees its blocks."""
    order_id: str = ""
    """The daemon's order, echoed in what goes back to it."""
    first_block: int = 0
    """The request's block number of block_ids[0]."""
    transfer: KVTransfer | None = None
    """Send to a peer's rank instead of the daemon (the daemon gets a delivery note)."""


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

            # Nothing imported can land more than this rank's whole cache.
            cache_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
            self._worker = _WorkerSide(
                self,
                get_tensor_model_parallel_rank(),
                str(extra[EXPORT_KEY]),
                str(extra[IMPORT_PREFIX_KEY]),
                cache_bytes,
            )
            if PEER_HOST_KEY in extra:
                self._worker.open_peer_channel(
                    str(extra[PEER_HOST_KEY]),
                    str(extra[PEER_ADVERTISE_KEY]),
                    int(extra[PEER_PORT_KEY]),
                    str(extra.get(PEER_SECRET_KEY_KEY, "")),
                    str(extra[PEER_TICKET_KEY]),
                    max_message_bytes=cache_bytes + (1 << 20),
                )
            self._worker.start()

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
        self._exporting: dict[str, tuple[int, str, KVTransfer | None]] = {}
        """Tag -> blocks already pre-copied (left out of the export), and where it goes."""
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
            tag, first, order_id = str(order["tag"]), int(order["first_block"]), str(order["id"])
            transfer = transfer_from_order(order)
            request = self._running.get(tag)
            is_live = request is not None and not request.is_finished()
            if order["op"] == "copy":
                blocks = self._full_blocks(request)[first:] if is_live else ()
                self._saves.append(Save("", tuple(blocks), False, order_id, first, transfer))
            elif is_live and request is not None:
                self._exporting[tag] = (first, order_id, transfer)
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
        exporting = self._exporting.pop(tag, None)
        if exporting is None:
            return False, None
        first, order_id, transfer = exporting
        num_cached = request.num_computed_tokens
        blocks = tuple(block_ids[first : math.ceil(num_cached / self._c._block_size)])
        self._saves.append(Save(request.request_id, blocks, True, order_id, first, transfer))
        return True, {TAG_KEY: tag, NUM_CACHED_TOKENS_KEY: num_cached}

    def _full_blocks(self, request: Request | None) -> list[int]:
        manager = self._c._kv_cache_manager
        if request is None or manager is None:
            return []
        num_full = request.num_computed_tokens // self._c._block_size
        return list(manager.get_block_ids(request.request_id)[0][:num_full])

    def has_work(self) -> bool:
        return bool(self._saves or self._loads or self._discards or not self._orders.empty())


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as a TCP endpoint writes it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _header(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _snapshot_tokens(request: Request, params: dict[str, Any]) -> int:
    """Tokens an imported snapshot restores: never the last one, which is computed again to
    sample the next."""
    return min(int(params[NUM_CACHED_TOKENS_KEY]), request.num_tokens - 1)


def _dealer(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    server_key: bytes,
    public: bytes,
    secret: bytes,
) -> zmq.Socket[bytes]:
    socket = context.socket(zmq.DEALER)
    if server_key:
        socket.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


class _WorkerSide:
    """Runs in each worker process: sends exported shards; a receiver thread takes imported
    ones into the inbox and a loader thread writes them into their blocks (see module)."""

    def __init__(
        self,
        connector: CascadeMpConnector,
        rank: int,
        export_address: str,
        import_prefix: str,
        cache_bytes: int,
    ) -> None:
        self._c = connector
        self._rank = rank
        self.caches: list[torch.Tensor] = []
        self._sent: set[str] = set()
        self._results = threading.Lock()
        self._received: set[str] = set()
        self._failed: set[str] = set()
        self._export_address = export_address
        self._out = connector._context.socket(zmq.PUSH)
        self._out.connect(export_address)
        self._inbox: ShardInbox[Load] = ShardInbox(
            wait_s=LOAD_WAIT_S,
            ttl_s=INBOX_TTL_S,
            max_entries=INBOX_MAX_SNAPSHOTS,
            max_bytes=max(cache_bytes, 1),
        )
        self._inbound = connector._context.socket(zmq.PULL)
        self._inbound.bind(import_address(import_prefix, rank))
        self._peers: zmq.Socket[bytes] | None = None
        self._peer_ticket = b""
        self._outgoing: queue.Queue[tuple[Save, list[memoryview]]] = queue.Queue()
        threading.Thread(target=self._load_forever, daemon=True).start()

    def open_peer_channel(
        self,
        host: str,
        advertise: str,
        port: int,
        secret_key: str,
        ticket: str,
        max_message_bytes: int,
    ) -> None:
        """Binds the rank-to-rank channel and tells the daemon its endpoint (see module)."""
        peers = self._c._context.socket(zmq.ROUTER)
        if secret_key:
            peers.setsockopt(zmq.CURVE_SERVER, 1)
            peers.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
        peers.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        peers.setsockopt(zmq.LINGER, 0)
        peers.bind(f"tcp://{_bracketed(host)}:{port + self._rank if port else 0}")
        self._peers = peers
        self._peer_ticket = ticket.encode()
        bound_port = peers.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        endpoint = f"tcp://{_bracketed(advertise)}:{bound_port}"
        self._out.send_multipart([self._c._secret, _header(hello=self._rank, endpoint=endpoint)])
        threading.Thread(target=self._send_forever, daemon=True).start()

    def start(self) -> None:
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._inbound, zmq.POLLIN)
        if self._peers is not None:
            poller.register(self._peers, zmq.POLLIN)
        while True:
            for socket, _ in poller.poll():
                if socket is self._inbound:
                    self._take_from_daemon(self._inbound.recv_multipart(copy=False))
                else:
                    self._take_from_peer(socket.recv_multipart(copy=False))

    def _take_from_daemon(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2 or not is_authentic(self._c._secret, frames[0].bytes):
            return
        header = json.loads(frames[1].bytes)
        # Views of ZeroMQ's own buffers: the shards are copied once, into the blocks.
        shards: list[Shard] = [frame.buffer for frame in frames[2:]]
        self._inbox.put(str(header["migration_id"]), shards)

    def _take_from_peer(self, frames: list[zmq.Frame]) -> None:
        """[peer identity, ticket, header, shard...]: a part of a snapshot, answered with
        [identity, "ok" or "refused", header]."""
        assert self._peers is not None
        if len(frames) < 3:
            return
        identity, header = frames[0].bytes, frames[2].bytes
        if not is_authentic(self._peer_ticket, frames[1].bytes):
            self._peers.send_multipart([identity, b"refused", header])
            return
        try:
            part = json.loads(header)
            transfer_id, first = str(part["transfer_id"]), int(part["first_block"])
            is_last = bool(part["is_last"])
        except (ValueError, KeyError, TypeError):
            self._peers.send_multipart([identity, b"refused", header])
            return
        self._inbox.put(transfer_id, [f.buffer for f in frames[3:]], first, is_last)
        self._peers.send_multipart([identity, b"ok", header])

    def load(self, meta: MpConnectorMetadata) -> None:
        """Hands the step's load orders to the loader thread; returns at once."""
        for migration_id in meta.discards:
            self._inbox.discard(migration_id)
        for load in meta.loads:
            self._inbox.expect(load.migration_id, load, load.first_block + len(load.block_ids))

    def _load_forever(self) -> None:
        # The blocks written here belong to requests vLLM parks until they are reported
        # received: no forward pass reads or writes them meanwhile.
        while True:
            # The timeout lets stale bytes expire. The received bytes are freed when
            # `_settle_due` returns, before the trim.
            if self._settle_due(self._inbox.next_due(timeout_s=1.0)) >= TRIM_AFTER_BYTES:
                release_freed_memory()

    def _settle_due(self, due: Due[Load]) -> int:
        """Writes the blocks of the loads `due` readies and settles them and the expired ones;
        returns the bytes received for them."""
        num_bytes = sum(memoryview(b).nbytes for _, shards in due.ready for b in shards)
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
        return num_bytes

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
            # The one copy out of the cache, here on the forward pass's thread: the blocks may
            # be freed or refilled once this step is over.
            blobs = read_block_rows(self.caches, self._c._num_blocks, save.block_ids)
            if save.transfer is not None:
                self._outgoing.put((save, blobs))  # the sender thread waits for the peer
            else:
                header = _header(order=save.order_id, rank=self._rank)
                self._out.send_multipart([self._c._secret, header, *blobs], copy=False)
            if save.releases:
                self._sent.add(save.request_id)

    def _send_forever(self) -> None:
        """Sends parts to peers' ranks, one at a time, and tells the daemon each outcome."""
        notes = self._c._context.socket(zmq.PUSH)  # sockets are not shared between threads
        notes.connect(self._export_address)
        public, secret = zmq.curve_keypair()
        peers: OrderedDict[tuple[str, bytes], zmq.Socket[bytes]] = OrderedDict()
        while True:
            save, blobs = self._outgoing.get()
            assert save.transfer is not None
            peer = save.transfer.peer
            key = (peer.endpoints[self._rank], peer.server_key)
            if key in peers:
                peers.move_to_end(key)
            else:
                peers[key] = _dealer(self._c._context, key[0], peer.server_key, public, secret)
                if len(peers) > MAX_PEER_SOCKETS:
                    peers.popitem(last=False)[1].close(linger=0)
            header = _header(
                transfer_id=save.transfer.transfer_id,
                first_block=save.first_block,
                is_last=save.releases,
            )
            socket = peers[key]
            socket.send_multipart([peer.ticket, header, *blobs], copy=False)
            num_bytes = sum(memoryview(b).nbytes for b in blobs)
            answer = b"no answer"
            if socket.poll(int(transfer_wait_s(PEER_ACK_TIMEOUT_S, num_bytes) * 1000)):
                answer, echoed = socket.recv_multipart()[:2]
                answer = answer if echoed == header else b"a mismatched answer"
            outcome: dict[str, object] = {"delivered": len(blobs)}
            if answer != b"ok":
                socket.close(linger=0)  # drops what is queued; the next part reconnects
                del peers[key]
                outcome = {"error": answer.decode(errors="replace")}
            notes.send_multipart(
                [self._c._secret, _header(order=save.order_id, rank=self._rank, **outcome)]
            )
            del save, blobs  # the copies read out of the cache, freed before the trim
            if num_bytes >= TRIM_AFTER_BYTES:
                release_freed_memory()
