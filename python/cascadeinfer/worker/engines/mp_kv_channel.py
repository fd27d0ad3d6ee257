"""The daemon's end of `mp_kv_connector`'s side channels: stop orders to the engine core, KV
shards from and to each tensor-parallel rank.

The sockets are ipc files in a fresh directory only this user can enter, and every message
carries a random per-engine secret that the connector checks (see mp_kv_connector.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time

import zmq

from cascadeinfer.worker.engines import mp_kv_connector as mkc

_CONTROL_TIMEOUT_MS = 5_000


class KVChannel:
    def __init__(self, tp_size: int) -> None:
        self._tp_size = tp_size
        self._secret = secrets.token_hex(32).encode()
        self._dir = tempfile.mkdtemp(prefix="cascade-kv-")
        os.chmod(self._dir, 0o700)
        self._context = zmq.Context()
        self._control: zmq.Socket[bytes] | None = None
        self._exports = self._context.socket(zmq.PULL)
        self._exports.bind(self._address("export"))
        self._imports: list[zmq.Socket[bytes]] = []
        self._stash: dict[str, dict[int, list[bytes]]] = {}
        """Export shards by tag and rank, as they arrived."""

    def _address(self, name: str) -> str:
        return f"ipc://{self._dir}/{name}"

    def extra_config(self) -> dict[str, str]:
        """What the connector needs, for `kv_connector_extra_config`."""
        return {
            mkc.SECRET_KEY: self._secret.decode(),
            mkc.CONTROL_KEY: self._address("control"),
            mkc.EXPORT_KEY: self._address("export"),
            mkc.IMPORT_PREFIX_KEY: self._address("import"),
        }

    def connect(self) -> None:
        """Once the engine runs (the connector bound its sockets)."""
        for rank in range(self._tp_size):
            socket = self._context.socket(zmq.PUSH)
            socket.connect(mkc.import_address(self._address("import"), rank))
            self._imports.append(socket)

    def stop(self, tag: str, first_block: int) -> None:
        """Orders the engine core to stop request `tag` for export (its blocks from
        `first_block` on); raises on no answer."""
        self._order({"op": "stop", "tag": tag, "first_block": first_block})

    def copy(self, tag: str, first_block: int) -> None:
        """Orders a copy of request `tag`'s full blocks from `first_block` on (it runs on)."""
        self._order({"op": "copy", "tag": tag, "first_block": first_block})

    def _order(self, order: dict[str, object]) -> None:
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

    def receive_export(self, tag: str, timeout_s: float) -> list[bytes]:
        """Every rank's shards of an export (or of a pre-copy: the tag plus COPY_SUFFIX),
        joined per block (rank order)."""
        deadline = time.monotonic() + timeout_s
        while len(self._stash.get(tag, {})) < self._tp_size:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._exports.poll(left_ms):
                raise RuntimeError(f"KV of {tag!r} did not arrive from every rank")
            frames = self._exports.recv_multipart()
            if len(frames) < 2 or not mkc.is_authentic(self._secret, frames[0]):
                continue
            header = json.loads(frames[1])
            self._stash.setdefault(str(header["tag"]), {})[int(header["rank"])] = frames[2:]
        shards = self._stash.pop(tag)
        if self._tp_size == 1:
            return shards[0]
        by_rank = [shards[r] for r in range(self._tp_size)]
        return [b"".join(parts) for parts in zip(*by_rank, strict=True)]

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
