"""What authenticating every link costs (`.venv/bin/python bench/bench_auth_overhead.py`): tokens
relayed per second through a scheduler over one sim worker with no step sleep, with and without
the cluster token (with it, every scheduler-to-worker call, the step feed included, goes
through the token interceptor, and the worker checks it). Concurrent streams, a warm-up round,
then the best of `--repeats` rounds."""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.security import TlsFiles, client_channel

from tests.worker.daemons import SIM_WORKER, start_scheduler, workers


def round_tokens_per_s(address: str, token: str, streams: int, max_tokens: int) -> float:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(client_channel(address, TlsFiles(), token))
    counts = [0] * streams

    def one(i: int) -> None:
        request = scheduler_pb2.ClientGenerateRequest(
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        )
        request.prompt_token_ids.ids.extend(range(1, 17 + i))
        for r in stub.Generate(request, timeout=300):
            counts[i] += len(r.tokens.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "token").write_text("bench-token\n")
        for token in ("", "bench-token"):
            auth = ["--auth-token-file", str(tmp / "token")] if token else []
            with workers([[*SIM_WORKER, "--sim-time-scale", "0", *auth]], tmp) as (w,):
                scheduler = start_scheduler(["--workers", w.address, *auth], tmp)
                try:
                    round_tokens_per_s(scheduler.address, token, args.streams, 200)
                    rates = [
                        round_tokens_per_s(scheduler.address, token, args.streams, args.max_tokens)
                        for _ in range(args.repeats)
                    ]
                finally:
                    scheduler.stop()
            label = "token on every link" if token else "no token"
            print(
                f"{label}: {max(rates):,.0f} tokens/s relayed (rounds: "
                f"{', '.join(f'{r:,.0f}' for r in rates)})"
            )


if __name__ == "__main__":
    main()
