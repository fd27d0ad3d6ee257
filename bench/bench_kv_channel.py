"""The rank-to-rank KV channel alone: one part of N MiB from a DEALER to a ROUTER over loopback
TCP, answered as a rank answers a part, with the socket options `mp_kv_connector` uses (CURVE
encryption, or in the clear as with `kv_peer_encrypt = false`). No engine: this is what the
channel costs on this host, the ceiling a migration stream between multiprocess vLLM workers
can reach (`bench_migration.py --engine vllm-mp` measures the whole move).

`python bench/bench_kv_channel.py [--part-mib 128] [--block-mib 2] [--repeats 5]`
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import zmq


def serve(router: zmq.Socket[bytes], num_parts: int) -> None:
    for _ in range(num_parts):
        frames = router.recv_multipart(copy=False)
        router.send_multipart([frames[0].bytes, b"ok", frames[2].bytes])
    router.close(linger=0)


def rate_mib_s(encrypt: bool, part_mib: int, block_mib: int, repeats: int) -> list[float]:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    if encrypt:
        server_public, server_secret = zmq.curve_keypair()
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
        public, secret = zmq.curve_keypair()
        dealer.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
        dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
    router.bind("tcp://127.0.0.1:0")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    server = threading.Thread(target=serve, args=(router, repeats))
    server.start()
    dealer.connect(endpoint)
    blocks = [bytearray(block_mib << 20) for _ in range(part_mib // block_mib)]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        dealer.send_multipart([b"ticket", b"header", *blocks], copy=False)
        dealer.recv_multipart()
        rates.append(part_mib / (time.perf_counter() - started))
    server.join()
    dealer.close(linger=0)
    context.term()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part-mib", type=int, default=128)
    parser.add_argument("--block-mib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| channel | MiB/s, median (range) |")
    print("|---|---|")
    for encrypt in (True, False):
        rates = rate_mib_s(encrypt, args.part_mib, args.block_mib, args.repeats)
        name = "CURVE-encrypted" if encrypt else "in the clear"
        print(f"| {name} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) |")


if __name__ == "__main__":
    main()
