"""The client load of tests/scheduler/load.py as a process of its own, so it can run on an
emulated host (`ip netns exec NS python -m tests.scheduler.remote_load ...`): it prints
`load running` once requests complete, stops after --duration seconds, judges every request
with the invariant checker and writes the verdict as JSON to --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from cascadeinfer.security import read_token, token_metadata

from tests.scheduler.load import STREAM_DEADLINE_S, Load, check, wait_until


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--auth-token-file", default="")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-deadline", type=float, default=STREAM_DEADLINE_S)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    metadata = token_metadata(read_token(a.auth_token_file))
    load = Load(
        a.address, a.concurrency, a.seed, metadata=metadata, stream_deadline_s=a.stream_deadline
    ).start()
    started = time.monotonic()
    wait_until(lambda: load.num_completed() > 0, 60, "no request completed")
    print("load running", flush=True)
    time.sleep(max(0.0, a.duration - (time.monotonic() - started)))
    outcomes = load.stop()
    verdict = check(outcomes)
    report = dataclasses.asdict(verdict)
    report["seconds"] = time.monotonic() - started
    a.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
