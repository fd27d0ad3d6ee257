"""The cluster across emulated hosts, longer than the CI test
(`sudo .venv/bin/python bench/bench_emulated_hosts.py`; needs root and iproute2): scheduler and
3 sim workers each in its own network namespace, links shaped to 10 Gbit/s and 0.2 ms (netem;
tbf and no delay where the kernel lacks netem), clients on the scheduler's host. Two runs: the
first stage's link cut for `--cut-s` seconds, then cut for good. Prints each run's requests,
losses, longest stream stall, and the migrations over the links (MiB per move, rate, pause)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scheduler.across_hosts import run_across_hosts
from tests.scheduler.hosts import why_unavailable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration-s", type=float, default=60)
    p.add_argument("--cut-at-s", type=float, default=20)
    p.add_argument("--cut-s", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--log-dir", type=Path, help="keep the daemons' logs here (default: dropped)")
    p.add_argument("--only-cut", action="store_true", help="skip the run with a link cut for good")
    a = p.parse_args()
    reason = why_unavailable()
    if reason is not None:
        sys.exit(f"cannot emulate hosts here: {reason}")
    for cut in (a.cut_s,) if a.only_cut else (a.cut_s, None):
        with tempfile.TemporaryDirectory() as tmp:
            log_dir = Path(tmp)
            if a.log_dir is not None:
                log_dir = a.log_dir / ("cut-for-good" if cut is None else f"cut-{cut:g}s")
                log_dir.mkdir(parents=True, exist_ok=True)
            result = run_across_hosts(
                log_dir,
                a.duration_s,
                a.cut_at_s,
                cut,
                concurrency=a.concurrency,
                link_timeout_s=10,
                orphan_timeout_s=30,
                stream_deadline_s=90,
            )
        print(result.summary())
        for line in result.verdict["lost"][:10]:
            print("  lost:", line)


if __name__ == "__main__":
    main()
