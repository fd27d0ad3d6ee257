"""The daemon's end of `mp_kv_connector`'s side channels: stop orders to the engine core, KV
shards from and to each tensor-parallel rank, and the ranks' rank-to-rank channel to peers.

The sockets are ipc files in a fresh directory only this user can enter, and every message
carries a random per-engine secret that the connector checks (see mp_kv_connector.py). The
rank-to-rank channel (`peer_host` given) is TCP on that host, encrypted with a CURVE key pair
made here (unless `peer_encrypt` is off), and a peer must show the ticket made here (`KVPeer`,
which GetInfo hands out).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from typing import Any

import zmq

from cascadeinfer.scratch_dirs import make_scratch_dir
from cascadeinfer.worker.engine import KVPeer, KVTransfer
from cascadeinfer.worker.engines import mp_kv_connector as mkc

_CONTROL_TIMEOUT_MS = 5_000
_MAX_STASHED_ORDERS = 16
"""Orders whose shards or notes are held; more only when some came after their wait ended."""
_HELLO_TIMEOUT_S = 30.0
"""Longest the ranks take to report their rank-to-rank endpoints once the engine runs."""


class KVChannel:
    def __init__(
        self,
        tp_size: int,
        peer_host: str | None = None,
        peer_port: int = 0,
        peer_advertise: str = "",
        peer_encrypt: bool = True,
    ) -> None:
        """`peer_host`: the address the ranks bind for peers (None: no rank-to-rank channel),
        `peer_advertise`: the host peers connect to ("" = peer_host)."""
        self._tp_size = tp_size
        self._secret = secrets.token_hex(32).encode()
        self._peer_host = peer_host
        self._peer_port = peer_port
        self._peer_advertise = peer_advertise or peer_host
        self._peer_public, self._peer_secret = zmq.curve_keypair() if peer_encrypt else (b"", b"")
        self._peer_ticket = secrets.token_hex(32)
        self._endpoints: dict[int, str] = {}
        self._dir = str(make_scratch_dir("cascade-kv-"))
        os.chmod(self._dir, 0o700)
        self._context = zmq.Context()
        self._control: zmq.Socket[bytes] | None = None
        self._exports = self._context.socket(zmq.PULL)
        self._exports.bind(self._address("export"))
        self._imports: list[zmq.Socket[bytes]] = []
        self._stash: dict[str, dict[int, tuple[dict[str, Any], list[bytes]]]] = {}
        """Export shards (or delivery notes) by tag and rank, as they arrived."""

    def _address(self, name: str) -> str:
        return f"ipc://{self._dir}/{name}"

    def extra_config(self) -> dict[str, str]:
        """What the connector needs, for `kv_connector_extra_config`."""
        config = {
            mkc.SECRET_KEY: self._secret.decode(),
            mkc.CONTROL_KEY: self._address("control"),
            mkc.EXPORT_KEY: self._address("export"),
            mkc.IMPORT_PREFIX_KEY: self._address("import"),
        }
        if self._peer_host is not None:
            config |= {
                mkc.PEER_HOST_KEY: self._peer_host,
                mkc.PEER_ADVERTISE_KEY: str(self._peer_advertise),
                mkc.PEER_PORT_KEY: str(self._peer_port),
                mkc.PEER_TICKET_KEY: self._peer_ticket,
            }
            if self._peer_secret:
                config[mkc.PEER_SECRET_KEY_KEY] = self._peer_secret.decode()
        return config

    def connect(self) -> None:
        """Once the engine runs (the connector bound its sockets, and each rank reports its
        rank-to-rank endpoint)."""
        for rank in range(self._tp_size):
            socket = self._context.socket(zmq.PUSH)
            socket.connect(mkc.import_address(self._address("import"), rank))
            self._imports.append(socket)
        if self._peer_host is None:
            return
        deadline = time.monotonic() + _HELLO_TIMEOUT_S
        while len(self._endpoints) < self._tp_size:
            if not self._receive_one(deadline):
                raise RuntimeError("the ranks did not report their rank-to-rank endpoints")

    @property
    def peer(self) -> KVPeer | None:
        """What a peer needs to send this engine's ranks KV directly; None without it."""
        if self._peer_host is None:
            return None
        endpoints = tuple(self._endpoints[r] for r in range(self._tp_size))
        return KVPeer(endpoints, self._peer_public, self._peer_ticket.encode())

    def stop(self, tag: str, first_block: int, transfer: KVTransfer | None = None) -> str:
        """Orders the engine core to stop request `tag` for export (its blocks from
        `first_block` on; to a peer's ranks with `transfer`); raises on no answer. Returns the
        order's id, under which the ranks' shards or notes come back."""
        return self._order({"op": "stop", "tag": tag, "first_block": first_block}, transfer)

    def copy(self, tag: str, first_block: int, transfer: KVTransfer | None = None) -> str:
        """Orders a copy of request `tag`'s full blocks from `first_block` on (it runs on)."""
        return self._order({"op": "copy", "tag": tag, "first_block": first_block}, transfer)

    def _order(self, order: dict[str, object], transfer: KVTransfer | None) -> str:
        order["id"] = order_id = secrets.token_hex(8)
        if transfer is not None:
            order["transfer"] = mkc.transfer_to_order(transfer)
        if self._control is None:
            self._control = self._context.socket(zmq.REQ)
            self._control.setsockopt(zmq.RCVTIMEO, _CONTROL_TIMEOUT_MS)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.connect(self._address("control"))
        self._control.send_multipart([self._secret, json.dumps(order).encode()])
        try:
            answer = self._control.recv()
        except zmq.Again:
            self._control.close()  # a REQ socket that missed its answer cannot send again
            self._control = None
            raise RuntimeError(f"the engine core did not answer the {order['op']} order") from None
        if answer != b"queued":
            raise RuntimeError(f"the engine core refused the {order['op']} order: {answer!r}")
        return order_id

    def receive_export(self, order_id: str, timeout_s: float) -> list[bytes]:
        """Every rank's shards of an export or a pre-copy (the order `stop` or `copy`
        returned), joined per block (rank order)."""
        shards = [frames for _, frames in self._from_every_rank(order_id, timeout_s)]
        if self._tp_size == 1:
            return shards[0]
        return [b"".join(parts) for parts in zip(*shards, strict=True)]

    def receive_delivered(self, order_id: str, timeout_s: float) -> int:
        """Blocks of an export or pre-copy that every rank delivered to the peer's rank; raises
        RuntimeError naming what went wrong where a rank could not."""
        notes = [header for header, _ in self._from_every_rank(order_id, timeout_s)]
        errors = sorted({str(n["error"]) for n in notes if "error" in n})
        if errors:
            raise RuntimeError(f"the peer's ranks did not take the KV: {errors}")
        delivered = {int(n["delivered"]) for n in notes}
        if len(delivered) != 1:
            raise RuntimeError(f"the ranks delivered different block counts: {delivered}")
        return delivered.pop()

    def _from_every_rank(
        self, order_id: str, timeout_s: float
    ) -> list[tuple[dict[str, Any], list[bytes]]]:
        deadline = time.monotonic() + timeout_s
        while len(self._stash.get(order_id, {})) < self._tp_size:
            if not self._receive_one(deadline):
                self._stash.pop(order_id, None)
                raise RuntimeError("the KV did not come from every rank")
        by_rank = self._stash.pop(order_id)
        return [by_rank[r] for r in range(self._tp_size)]

    def _receive_one(self, deadline: float) -> bool:
        """Files one message from a rank (False once the deadline passed without one)."""
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not self._exports.poll(left_ms):
            return False
        frames = self._exports.recv_multipart()
        if len(frames) < 2 or not mkc.is_authentic(self._secret, frames[0]):
            return True
        header = json.loads(frames[1])
        if "hello" in header:
            self._endpoints[int(header["hello"])] = str(header["endpoint"])
        else:
            by_rank = self._stash.setdefault(str(header["order"]), {})
            by_rank[int(header["rank"])] = (header, frames[2:])
            while len(self._stash) > _MAX_STASHED_ORDERS:  # what came after its wait ended
                del self._stash[next(iter(self._stash))]
        return True

    def send_import(self, migration_id: str, blocks: list[bytes]) -> None:
        """Each rank gets its slice of every block under `migration_id`."""
        header = json.dumps({"migration_id": migration_id}).encode()
        for rank, socket in enumerate(self._imports):
            shards = [_slice(b, rank, self._tp_size) for b in blocks]
            # copy=False: ZeroMQ sends from the blocks' own buffers (megabytes each).
            socket.send_multipart([self._secret, header, *shards], copy=False)

    def close(self) -> None:
        self._context.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)


def _slice(blob: bytes, rank: int, tp_size: int) -> bytes:
    width = len(blob) // tp_size
    return blob[rank * width : (rank + 1) * width]
